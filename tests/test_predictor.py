"""GNN predictor: target parser, data encoding, ranking losses, model, K-fold training and ensemble."""
from __future__ import annotations

import copy
import json
import math
import pickle

import networkx as nx
import numpy as np
import pytest
import torch
from autobuild.pyg import Batch

from autobuild.data import (BIT_CODES, QUANT_CODES, GraphTemplate, cache_to_dataset, encode_options, option_codes,
                            option_columns, pair_columns,
                            record_to_data, sequential_graph)
from autobuild.gnn import SensitivityGNN
from autobuild.losses import (exact_rank, hybrid_loss, lambda_rank_loss, ndcg_at_k, soft_rank, spearman_loss, srcc)
from autobuild.target import LearningPlan, TargetError, learning_plan, parse_target
from autobuild.train import TrainOptions, load_ensemble, make_folds, train_predictor

METHODS = ("mse", "kmeans", "kmeans_all")


# ------------------------------------------------------------------------------------------------ target
def test_target_expression_with_dashed_keys():
    record = {"FID-GT-1k": 12.5, "avg_bits": 3.5, "FID": 99.0}
    t = parse_target("-1*FID-GT-1k - avg_bits*150", keys=record)
    assert t.names == ("FID-GT-1k", "avg_bits")
    assert t(record) == pytest.approx(-12.5 - 525.0)
    # longest key first: "FID-GT-1k" is not read as FID - GT - 1k even though FID is a key
    assert parse_target("FID-GT-1k-FID", keys=record)(record) == pytest.approx(12.5 - 99.0)
    assert parse_target("-(avg_bits - 3) / 2 + +1e1", keys=record)(record) == pytest.approx(-0.25 + 10)
    assert record == {"FID-GT-1k": 12.5, "avg_bits": 3.5, "FID": 99.0}


def test_learning_plan_splits_measured_and_configuration_keys():
    records = [{"FID-GT-1k": f, "avg_bits": b, "psnr_fp": p} for f, b, p in [(60.0, 3.5, 20.0), (90.0, 3.2, 18.0)]]
    plan = learning_plan(parse_target("-1*FID-GT-1k - avg_bits*150", keys=records[0]), records)
    assert (plan.key, plan.log, plan.sign, plan.known) == ("FID-GT-1k", True, -1.0, ("avg_bits",))
    assert np.allclose(plan.learned(records), np.log([60.0, 90.0]))
    composed = plan.compose(torch.tensor(plan.learned(records)), torch.tensor(plan.known_values(records)))
    assert np.allclose(composed.numpy(), [-60 - 525, -90 - 480])  # the target, exactly
    assert LearningPlan.from_json(plan.to_json()) == plan
    # two measured keys, or learn="target": the network learns the target itself
    assert learning_plan(parse_target("-FID-GT-1k + psnr_fp", keys=records[0]), records).key is None
    assert learning_plan(plan.target, records, mode="target").key is None
    # no single orientation (FID * (avg_bits - 3.3) flips sign) -> learn the target
    assert learning_plan(parse_target("FID-GT-1k * (avg_bits - 3.3)", keys=records[0]), records).key is None
    # a key that may be <= 0 is learned as is
    assert not learning_plan(parse_target("psnr_fp - avg_bits", keys=records[0]),
                             records + [{"FID-GT-1k": 1.0, "avg_bits": 3.0, "psnr_fp": -1.0}]).log


@pytest.mark.parametrize("hostile", ["__import__('os')", "__import__", "avg_bits.__class__", "[avg_bits]",
                                     "lambda: 1", "avg_bits ** 2", "avg_bits if 1 else 2", "open", "1; 2", "",
                                     "avg_bits2", "avg_bits(1)"])
def test_target_rejects_unsafe_or_unknown(hostile):
    with pytest.raises(TargetError):
        parse_target(hostile)


def test_target_unknown_name_lists_keys_and_missing_key_is_clear():
    with pytest.raises(TargetError, match="available record keys:.*avg_bits"):
        parse_target("-psnr_xyz", keys=["my-key"])
    t = parse_target("-my-key*2", keys=["my-key"])
    assert t({"my-key": 2.0}) == -4.0
    with pytest.raises(KeyError, match="my-key"):
        t({"avg_bits": 3})


# ------------------------------------------------------------------------------------------------ data
def _hand_graph() -> nx.DiGraph:
    """in -> (q, k) -> matmul -> out -> add(in, out); `k` has a tied alias."""
    g = nx.DiGraph(family="toy")
    g.add_node("in", kind="layer", key="model.in.weight_quantizer", op="Patchify", block=-1, aliases=[])
    g.add_node("q", kind="layer", key="model.b.0.q.weight_quantizer", op="SA-Q", block=0, aliases=[])
    g.add_node("k", kind="layer", key="model.b.0.k.weight_quantizer", op="SA-K", block=0,
               aliases=["model.b.1.k.weight_quantizer"])
    g.add_node("mm", kind="combine", op="matmul", block=0)
    g.add_node("out", kind="layer", key="model.b.0.out.weight_quantizer", op="SA-Out", block=0, aliases=[])
    g.add_node("add", kind="combine", op="add", block=0)
    g.add_edges_from([("in", "q"), ("in", "k"), ("q", "mm"), ("k", "mm"), ("mm", "out"), ("out", "add"), ("in", "add")])
    return g


def _hand_record(options: dict[str, str], rng=None) -> dict:
    rng = rng or np.random.default_rng(0)
    config = {}
    for key, option in options.items():
        bits = 16 if option == "fp16" else int(option.rsplit("-", 1)[1])
        config[key] = [option, 2000, 2000 * bits // 16 + (0 if bits == 16 else 10), 0.0 if option == "fp16" else float(rng.uniform(0.001, 0.1))]
    return {"config": config, "FID-GT-1k": 10.0, "avg_bits": 3.7}


def test_option_codes():
    assert option_codes("mse-4") == (1, 1) and option_codes("kmeans-3") == (2, 2)
    assert option_codes("kmeans_all-3") == (3, 2) and option_codes("fp16") == (4, 0)
    assert option_codes("mse-8") == (1, BIT_CODES[8]) and option_codes("mse-2") == (1, BIT_CODES[2])
    for bad in ("mse-9", "foo-4", "combine-16", "mse"):
        with pytest.raises(ValueError):
            option_codes(bad)
    assert QUANT_CODES["combine"] == 0 and BIT_CODES[16] == 0


def test_record_to_data_features_aliases_and_no_mutation():
    g = _hand_graph()
    record = _hand_record({"model.in.weight_quantizer": "mse-4", "model.b.0.q.weight_quantizer": "kmeans-3",
                           "model.b.0.k.weight_quantizer": "kmeans_all-3", "model.b.1.k.weight_quantizer": "mse-4",
                           "model.b.0.out.weight_quantizer": "fp16"})
    snapshot = copy.deepcopy(record)
    data = record_to_data(record, g, target=lambda r: -r["FID-GT-1k"])
    assert record == snapshot  # the reference deleted keys from the record in place
    assert data.num_nodes == 6 and data.edge_index.shape == (2, 7)
    quant, bits, op, block = data.x_cat.t().tolist()
    assert quant == [1, 2, 3, 0, 4, 0] and bits == [1, 2, 2, 0, 0, 0]
    vocab = sorted({"Patchify", "SA-Q", "SA-K", "matmul", "SA-Out", "add"})
    assert op == [vocab.index(o) + 1 for o in ("Patchify", "SA-Q", "SA-K", "matmul", "SA-Out", "add")]
    assert block == [0, 1, 1, 1, 1, 1]
    entry = record["config"]["model.b.0.k.weight_quantizer"]  # canonical key wins over the alias entry
    assert data.x_num[2, 0].item() == pytest.approx(entry[1] / entry[2])
    assert data.x_num[2, 1].item() == pytest.approx(math.log1p(100 * entry[3]))
    assert data.x_num[3].abs().sum() == 0 and data.x_num[4, 0].item() == pytest.approx(1.0)
    assert data.y.item() == -10.0
    # hop 0 reads layer nodes; hops without unit outputs read every node
    assert data.hop_mask[:, 0].tolist() == [True, True, True, False, True, False] and data.hop_mask[:, 1:].all()
    # an alias alone stands in for its canonical key; a missing layer is an error unless treated as fp16
    alias_only = copy.deepcopy(record)
    del alias_only["config"]["model.b.0.k.weight_quantizer"]
    assert record_to_data(alias_only, g).x_cat[2, :2].tolist() == [1, 1]
    del alias_only["config"]["model.b.1.k.weight_quantizer"]
    with pytest.raises(KeyError, match="model.b.0.k"):
        record_to_data(alias_only, g)
    assert record_to_data(alias_only, g, missing="fp16").x_cat[2, :2].tolist() == [4, 0]


def test_units_set_hop_readouts_and_template_roundtrip():
    from collections import namedtuple

    Unit = namedtuple("Unit", "name nodes output hops")
    g = _hand_graph()
    template = GraphTemplate.from_graph(g, units=[Unit("attn", ["q", "k", "mm", "out"], "out", 2),
                                                  Unit("res", ["out", "add"], "add", 1)])
    assert template.hop_mask[:, 2].tolist() == [False, False, False, False, True, False]
    assert template.hop_mask[:, 1].tolist() == [False, False, False, False, False, True]
    # depths no unit has read the unit structure (deeper units' outputs, else every unit output), never all nodes
    assert template.hop_mask[:, 3].tolist() == template.hop_mask[:, 4].tolist() == [False] * 4 + [True, True]
    deeper = GraphTemplate.from_graph(g, units=[Unit("attn", ["q", "k", "mm", "out"], "out", 3),
                                                Unit("res", ["out", "add"], "add", 1)])
    assert deeper.hop_mask[:, 2].tolist() == deeper.hop_mask[:, 3].tolist() == [False] * 4 + [True, False]
    assert GraphTemplate.from_graph(g).hop_mask[:, 1:].all()  # no units: global means
    again = GraphTemplate.from_json(json.loads(json.dumps(template.to_json())))
    assert torch.equal(again.edge_index, template.edge_index) and torch.equal(again.hop_mask, template.hop_mask)
    assert again.static_codes().tolist() == template.static_codes().tolist()


def _random_hand_records(g, rng, n: int) -> list[dict]:
    """``n`` records of the hand graph with a random method-bits option per layer."""
    keys = [g.nodes[node]["key"] for node in g if g.nodes[node]["kind"] == "layer"]
    return [_hand_record({k: f"{METHODS[rng.integers(3)]}-{3 + rng.integers(2)}" for k in keys}, rng)
            for _ in range(n)]


def test_fast_collate_matches_pyg_batch():
    g = _hand_graph()
    records = _random_hand_records(g, np.random.default_rng(1), 5)
    keys = [g.nodes[n]["key"] for n in g if g.nodes[n]["kind"] == "layer"]
    ds = cache_to_dataset(records, g, target=lambda r: -r["FID-GT-1k"])
    fast = ds.collate([3, 0, 4])
    slow = Batch.from_data_list([ds[3], ds[0], ds[4]])
    for name in ("x_cat", "x_num", "edge_index", "hop_mask", "batch", "ptr", "y"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    columns = option_columns(records, keys)
    features = encode_options(records, columns)
    assert features.shape == (5, len(columns)) and (features.sum(1) == len(keys)).all()


def test_encode_options_one_hot_and_pair_terms_by_hand():
    items = [{"config": {"a": ["mse-3", 1, 1, 0.1], "b": ["kmeans-4", 1, 1, 0.2]}}, {"a": "mse-4", "b": "kmeans-4"}]
    singles = option_columns(items, ["a", "b"])
    assert singles == [(("a", "mse-3"),), (("a", "mse-4"),), (("b", "kmeans-4"),)]
    pairs = pair_columns(items, ["a", "b"])
    assert pairs == [(("a", "mse-3"), ("b", "kmeans-4")), (("a", "mse-4"), ("b", "kmeans-4"))]
    x = encode_options(items, singles + pairs)
    assert x.tolist() == [[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]]
    # saved spellings: "key=option" for one term, [[key, option], ...] for a product; the same rows
    from autobuild.data import column_to_json
    saved = json.loads(json.dumps([column_to_json(c) for c in singles + pairs]))
    assert saved[0] == "a=mse-3" and saved[3] == [["a", "mse-3"], ["b", "kmeans-4"]]
    assert np.array_equal(encode_options(items, saved), x)
    assert encode_options([{"a": "kmeans-3"}], singles).tolist() == [[0, 0, 0]]  # lenient: unknown lights nothing
    with pytest.raises(ValueError, match="not an option"):
        encode_options([{"a": "kmeans-3", "b": "kmeans-4"}], singles, strict=True)
    with pytest.raises(ValueError, match="no entry for layer 'b'"):
        encode_options([{"a": "mse-3"}], singles, strict=True)


def _interaction_records(n: int, seed: int, interaction: float) -> tuple[list[dict], np.ndarray, list[str]]:
    """8 layers x 6 options; log FID = random per-(layer, option) main effects + ``interaction`` where layers 0
    and 1 are both at 3 bits (an AND no additive model has) + noise."""
    rng = np.random.default_rng(seed)
    keys = [f"model.l{i}.weight_quantizer" for i in range(8)]
    options = [f"{m}-{b}" for m in METHODS for b in (3, 4)]
    effect = {(k, o): rng.normal(0, 0.2) for k in keys for o in options}
    records, learned = [], []
    for _ in range(n):
        choice = {k: options[rng.integers(len(options))] for k in keys}
        value = sum(effect[k, o] for k, o in choice.items()) + rng.normal(0, 0.05)
        value += interaction * (choice[keys[0]].endswith("-3") and choice[keys[1]].endswith("-3"))
        records.append({"config": {k: [o, 100, 30, 0.01] for k, o in choice.items()}})
        learned.append(value)
    return records, np.array(learned), keys


@pytest.mark.parametrize("interaction", [0.0, 1.5])
def test_prior_finds_a_pair_interaction_and_keeps_additive_data_additive(interaction):
    from autobuild.ensemble import prior_values
    from autobuild.train import fit_prior, ridge_prior

    records, learned, keys = _interaction_records(240, seed=7, interaction=interaction)
    train, test = np.arange(180), np.arange(180, 240)
    prior, ridge = fit_prior(records, learned, train, keys, seed=0), ridge_prior(records, learned, train, keys)
    held_out = [records[i] for i in test]
    ours = srcc(prior_values(prior, held_out), torch.as_tensor(learned[test]))
    theirs = srcc(prior_values(ridge, held_out), torch.as_tensor(learned[test]))
    assert set(prior["cv_mse"]) == {"ridge", "lasso", "lasso_pairs"}
    assert prior["cv_mse"][prior["kind"]] == min(prior["cv_mse"].values())
    if interaction:
        assert prior["kind"] == "lasso_pairs" and ours > theirs + 0.05  # seen: 0.99 vs 0.83
        pair = [c for c, w in zip(prior["columns"], prior["coef"]) if isinstance(c, list) and abs(w) > 0.2]
        assert pair and all({term[0] for term in c} == {keys[0], keys[1]} for c in pair)
    else:
        assert prior["kind"] != "lasso_pairs" and ours > theirs - 0.02  # seen: lasso 0.995, ridge 0.994


# ------------------------------------------------------------------------------------------------ losses
def test_soft_rank_tends_to_exact_rank():
    x = torch.tensor([0.3, -1.2, 2.0, 0.3, 5.0, -0.7])
    exact = exact_rank(x)
    assert exact.tolist() == [3.5, 1.0, 5.0, 3.5, 6.0, 2.0]
    errors = [(soft_rank(x, tau) - exact).abs().max().item() for tau in (1.0, 0.1, 0.01, 0.001)]
    assert errors[-1] < 1e-3 and all(a >= b for a, b in zip(errors, errors[1:]))
    from scipy.stats import rankdata
    y = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert np.allclose(soft_rank(y, 1e-4).numpy(), rankdata(y.numpy()), atol=1e-3)


def test_spearman_loss_and_metrics():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(64, generator=gen)
    assert spearman_loss(target * 3 + 1, target, tau=0.01).item() < 1e-3
    assert spearman_loss(-target, target, tau=0.01).item() > 1.99
    pred = torch.randn(64, generator=gen, requires_grad=True)
    loss = spearman_loss(pred, target)
    loss.backward()
    assert pred.grad.abs().sum() > 0
    from scipy.stats import spearmanr
    assert srcc(pred.detach(), target) == pytest.approx(spearmanr(pred.detach().numpy(), target.numpy())[0], abs=1e-9)
    from sklearn.metrics import ndcg_score
    gains = (target - target.min()) / (target.max() - target.min())
    expected = ndcg_score(gains.numpy()[None], pred.detach().numpy()[None], k=10)
    assert ndcg_at_k(pred.detach(), target, k=10) == pytest.approx(expected, abs=1e-6)
    assert ndcg_at_k(target, target, k=10) == pytest.approx(1.0)


def test_lambda_rank_trains_a_linear_scorer():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    true_w = torch.tensor([2.0, -1.0, 0.5, 0.0, 0.0, 1.5, 0.0, -0.5])
    target = x @ true_w + 0.1 * torch.randn(256, generator=gen)
    scorer = torch.nn.Linear(8, 1)
    torch.nn.init.normal_(scorer.weight, generator=gen)
    before = ndcg_at_k(scorer(x).squeeze(-1).detach(), target)
    loss = lambda_rank_loss(scorer(x).squeeze(-1), target, k=10)
    loss.backward()
    assert loss.requires_grad and scorer.weight.grad.abs().sum() > 0
    opt = torch.optim.Adam(scorer.parameters(), lr=0.05)
    first = None
    for step in range(150):
        batch = torch.randint(0, 256, (64,), generator=gen)
        loss = lambda_rank_loss(scorer(x[batch]).squeeze(-1), target[batch], k=10)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = ndcg_at_k(scorer(x).squeeze(-1).detach(), target)
    assert after > before + 0.1 and after > 0.9
    # the hybrid loss is differentiable too
    pred = torch.randn(32, requires_grad=True)
    hybrid_loss(pred, torch.randn(32)).backward()
    assert pred.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ model
def test_gnn_forward_hop_scores_are_masked_means():
    g = _hand_graph()
    records = _random_hand_records(g, np.random.default_rng(2), 4)
    ds = cache_to_dataset(records, g)
    torch.manual_seed(0)
    model = SensitivityGNN(ds.template.num_ops, ds.template.num_blocks, hidden=16, layers=4, heads=2)
    batch = ds.collate()
    out = model(batch)
    assert out["pred"].shape == (4,) and out["hop_scores"].shape == (4, 5)
    hs = model.node_embeddings(batch)
    assert hs.shape == (24, 5, 16) and (hs >= 0).all()
    mask0 = batch.hop_mask[:, 0].view(4, 6)
    expected = torch.stack([hs[:, 0].view(4, 6, 16)[i][mask0[i]].mean(0).abs().sum() for i in range(4)])
    assert torch.allclose(out["hop_scores"][:, 0], expected, atol=1e-5)
    assert torch.allclose(model.node_hop_norms(batch), hs.abs().sum(-1))
    out["pred"].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.convs.parameters())
    model.eval()  # a single unit graph goes through in eval mode (BatchNorm running stats)
    single = model(ds[0])
    assert single["hop_scores"].shape == (1, 5)


# ------------------------------------------------------------------------------------------------ training
def _synthetic_cache(n: int, seed: int = 0):
    """Configs of the tiny DiT's layers; FID = sum of per-layer penalties, dominated by a few sensitive
    layers; 3 bits cost more than 4; K-Means-C < K-Means-A < UAQ. Known structure, avg_bits only weakly
    informative."""
    from multiquant.families import get_family
    from multiquant.layers import quantizable_layers

    family = get_family("dit")
    model = family.build("tiny")
    layers = quantizable_layers(model, family)
    canonical = [ref for ref in layers if not ref.tied_to]
    rng = np.random.default_rng(seed)
    sensitivity = {ref.key: 0.05 for ref in canonical}
    for ref in rng.choice(canonical, 3, replace=False):
        sensitivity[ref.key] = 3.0
    method_penalty = {"mse": 1.0, "kmeans": 0.3, "kmeans_all": 0.6}
    fp_total = sum(ref.numel * 2 for ref in layers)
    records = []
    for i in range(n):
        p = rng.uniform()
        config, penalty = {}, 0.0
        for ref in canonical:
            bits = 3 if rng.uniform() < p else 4
            method = METHODS[rng.integers(3)]
            quant_bytes = int(ref.numel * bits / 8 + ref.channels * 4)
            error = 0.01 * method_penalty[method] * (2.5 if bits == 3 else 1.0)
            config[ref.key] = [f"{method}-{bits}", ref.numel * 2, quant_bytes, error]
            penalty += sensitivity[ref.key] * method_penalty[method] * (3.0 if bits == 3 else 1.0)
        for ref in layers:
            if ref.tied_to:
                config[ref.key] = list(config[ref.tied_to])
        avg_bits = 16 * sum(e[2] for e in config.values()) / fp_total
        records.append({"config": config, "FID-GT-1k": 10 + penalty + rng.normal(0, 0.2), "avg_bits": avg_bits,
                        "quantized_size": sum(e[2] for e in config.values()), "psnr_fp": 30 - penalty,
                        "quantized_error": sum(e[3] for e in config.values()), "index": i, "seed": seed})
    return model, family, records


def test_cross_validated_gnn_beats_avg_bits(tmp_path):
    model, family, records = _synthetic_cache(150)
    snapshot = copy.deepcopy(records)
    graph = sequential_graph(model, family)
    opts = TrainOptions(hidden=32, patience=15, lr=3e-3)  # a higher rate than the default: few epochs here
    metrics = train_predictor(records, graph, "-1*FID-GT-1k - avg_bits*2", loss="hybrid", folds=3, epochs=30,
                              batch_size=50, seed=0, out_dir=tmp_path, options=opts, log=None)
    assert records == snapshot
    baselines = metrics["baselines"]
    assert {"avg_bits", "quantized_error", "psnr_fp", "ridge_options"} <= set(baselines)
    assert metrics["srcc_mean"] > 0.8
    assert metrics["srcc_mean"] > baselines["avg_bits"]["srcc_mean"] + 0.2
    assert len(metrics["folds"]) == 3 and all(len(f["hop_srcc"]) == 5 for f in metrics["folds"])
    members = sorted(i for fold in metrics["fold_members"] for i in fold)
    assert members == list(range(150))  # the folds partition the records
    assert [sorted(m) for m in metrics["fold_members"]] == [f.tolist() for f in make_folds(150, 3, 0)]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["srcc_mean"] == pytest.approx(metrics["srcc_mean"])
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pt"))

    ensemble = load_ensemble(tmp_path)
    out = ensemble.predict(records[:40])
    target = np.array([-r["FID-GT-1k"] - 2 * r["avg_bits"] for r in records[:40]])
    assert out["pred"].shape == (40,) and out["fold_pred"].shape == (3, 40) and out["hop_scores"].shape == (40, 5)
    assert srcc(torch.tensor(out["pred"]), torch.tensor(target)) > 0.8
    assert metrics["learned"] == {"target": "-1*FID-GT-1k - avg_bits*2", "key": "FID-GT-1k", "log": True,
                                  "sign": -1.0, "known": ["avg_bits"], "learned": "log(FID-GT-1k)"}
    # the target is composed from the predicted FID and the records' exact avg_bits
    assert np.allclose(out["pred"], -out["learned"] - 2 * np.array([r["avg_bits"] for r in records[:40]]))
    datas = [ensemble.template.to_data(r["config"]) for r in records[:5]]
    with pytest.raises(ValueError, match="pass records"):  # the linear prior reads each record's options
        ensemble.predict(datas)
    # every fold's prediction = its ridge prior on the one-hot options + the network's residual
    assert metrics["prior_columns"] and all(len(f["prior"]["coef"]) == len(metrics["prior_columns"])
                                            for f in json.loads((tmp_path / "ensemble.json").read_text())["folds"])
    # unit scoring reads node norms: the score of the last node of each graph
    batch = Batch.from_data_list(datas)
    scores = ensemble.score_nodes(batch, batch.ptr[1:] - 1, 0)
    assert scores.shape == (5,) and np.isfinite(scores).all()


def test_train_predictor_script(tmp_path):
    pytest.importorskip("autobuild.dag")
    from qua2sedimo.cli import main

    _, _, records = _synthetic_cache(40, seed=1)
    cache = tmp_path / "quant_cache.pkl"
    cache.write_bytes(pickle.dumps(records))
    out = tmp_path / "run"
    assert main(["train-predictor", "--cache", str(cache), "--model", "dit", "--size", "tiny", "--target", "-1*FID-GT-1k",
                 "--loss", "srcc", "--out", str(out), "--epochs", "2", "--folds", "2", "--hidden", "16",
                 "--seed", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["folds_k"] == 2 and "avg_bits" in metrics["baselines"] and "srcc_mean" in metrics
    # by default the hop read-outs are the block units' outputs (as the demo and benchmarks train), never global means
    from autobuild.dag import units
    from autobuild.train_predictor import family_graph

    graph = family_graph("dit", "tiny")
    saved = GraphTemplate.from_json(json.loads((out / "ensemble.json").read_text())["template"])
    assert torch.equal(saved.hop_mask, GraphTemplate.from_graph(graph, units(graph, "block"), 4).hop_mask)
    assert not saved.hop_mask[:, 1:].all(dim=0).any()
    assert load_ensemble(out).predict(records[:3])["pred"].shape == (3,)


def test_auto_prior_and_tabular_baselines_on_an_interaction(tmp_path):
    """FID jumps only when two given layers are both at 3 bits (an AND no additive model has): the gradient-boosted
    trees baseline must rank it better than ridge; with linear_prior="auto" every fold says which it kept."""
    model, family, records = _synthetic_cache(240, seed=3)
    keys = [k for k in records[0]["config"]]
    a, b = keys[0], keys[1]
    rng = np.random.default_rng(5)
    for r in records:
        both = r["config"][a][0].endswith("-3") and r["config"][b][0].endswith("-3")
        r["FID-GT-1k"] = 10.0 + 40.0 * both + 0.1 * (r["FID-GT-1k"] - 10.0) + rng.normal(0, 0.05)
    graph = sequential_graph(model, family)
    opts = TrainOptions(hidden=16, patience=5, lr=3e-3, linear_prior="auto", tabular_baselines=True)
    metrics = train_predictor(records, graph, "-1*FID-GT-1k", folds=2, epochs=8, batch_size=64, seed=0,
                              out_dir=tmp_path, options=opts, log=None)
    base = metrics["baselines"]
    assert {"gbm_learned", "ridge_gbm_learned", "ridge_learned", "prior_learned"} <= set(base)
    assert base["gbm_learned"]["srcc_mean"] > base["ridge_learned"]["srcc_mean"]  # seen: 0.82 vs 0.77
    assert all(isinstance(f["prior_used"], bool) for f in metrics["folds"])
    # the prior's pair terms hold the AND: prior alone and the predictor (with it where kept) beat ridge
    assert base["prior_learned"]["kind"] == ["lasso_pairs"] * 2
    assert base["prior_learned"]["srcc_mean"] > base["ridge_learned"]["srcc_mean"] + 0.02  # seen: 0.781 vs 0.745
    assert metrics["srcc_mean"] > base["ridge_learned"]["srcc_mean"] + 0.02  # seen: 0.781 (the prior kept)
    out = load_ensemble(tmp_path).predict(records[:10])
    assert out["learned_std"].shape == (10,) and (out["learned_std"] >= 0).all()


def test_k_fold_ridge_equals_scikit_learns_ridgecv_over_k_folds():
    """The prior's seeded K-fold ridge (one SVD per fold for the whole alpha path) is RidgeCV(cv=KFold): the same
    alpha, the same refit coefficients bit for bit, the same fold-averaged MSE to rounding; sparse one-hot columns
    with and without a dense block, few and many records, noise from tiny to large."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold

    from autobuild.train import RIDGE_ALPHAS, _fit_ridge, _inner_folds

    rng = np.random.default_rng(3)
    for trial in range(12):  # each of the 2 x 3 column and noise kinds twice
        records, width = int(rng.integers(6, 120)), int(rng.integers(3, 150))
        x = (rng.random((records, width)) < 0.3) * rng.normal(1, 1, (1, width))
        if trial % 2:
            x = np.hstack([x, 10 * rng.normal(0, 1, (records, 8))])
        y = x @ rng.normal(0, 1, x.shape[1]) + rng.normal(0, [1e-3, 0.5, 3.0][trial % 3], records)
        seed = int(rng.integers(1000))
        expected = RidgeCV(alphas=RIDGE_ALPHAS, cv=KFold(_inner_folds(records), shuffle=True, random_state=seed),
                           scoring="neg_mean_squared_error").fit(x, y)
        got = _fit_ridge(x, y, seed)
        assert got.alpha_ == expected.alpha_, trial
        assert np.array_equal(got.coef_, expected.coef_) and got.intercept_ == expected.intercept_, trial
        assert got.best_score_ == pytest.approx(expected.best_score_, rel=1e-9), trial


def test_prior_on_a_training_part_too_small_for_inner_folds_is_ridge():
    from autobuild.train import fit_prior

    records, learned, keys = _interaction_records(4, seed=2, interaction=1.0)
    prior = fit_prior(records, learned, np.arange(2), keys)
    assert prior["kind"] == "ridge" and len(prior["coef"]) == len(prior["columns"])
    assert fit_prior(records, learned, np.arange(4), keys)["kind"] in ("ridge", "lasso", "lasso_pairs")


def test_output_shift_baselines_hold_a_cancellation_that_one_hot_models_cannot(tmp_path):
    """FID grows with |shift(a) + shift(b)|: one layer's signed shift alone hurts, both together cancel (the
    mnist_unet conv_out / skip pattern). The baselines given the configurations' summed shift rank it far better
    than ridge on the options."""
    model, family, records = _synthetic_cache(160, seed=4)
    keys = [k for k in records[0]["config"]]
    a, b = keys[0], keys[1]
    options = sorted({r["config"][k][0] for r in records for k in keys})
    table = {k: {o: [0.0] for o in options} for k in keys}
    for o in options:
        if o.startswith("mse"):
            table[a][o], table[b][o] = [1.0], [-1.0]
    rng = np.random.default_rng(6)
    for r in records:
        shift = table[a][r["config"][a][0]][0] + table[b][r["config"][b][0]][0]
        r["FID-GT-1k"] = 10.0 + 40.0 * abs(shift) + rng.normal(0, 0.5)
    opts = TrainOptions(hidden=16, patience=2, tabular_baselines=True, output_shifts=table)
    metrics = train_predictor(records, sequential_graph(model, family), "-1*FID-GT-1k", folds=2, epochs=2,
                              batch_size=64, seed=0, out_dir=tmp_path, options=opts, log=None)
    base = metrics["baselines"]
    assert base["ridge_shift_learned"]["srcc_mean"] > base["ridge_learned"]["srcc_mean"] + 0.1
    assert base["gbm_shift_learned"]["srcc_mean"] > base["gbm_learned"]["srcc_mean"] + 0.1, base


def _shift_records(n: int, seed: int, dims: int, interaction) -> tuple[list[dict], np.ndarray, list[str], dict]:
    """8 layers x 6 options, each (layer, option) a random ``dims``-vector output change (layers 0 and 1 large); log
    FID = per-option main effects + ``interaction(summed change)`` + noise: a term of the summed signed changes,
    whose cross terms between layers are interactions no one-hot model has."""
    rng = np.random.default_rng(seed)
    keys = [f"model.l{i}.weight_quantizer" for i in range(8)]
    options = [f"{m}-{b}" for m in METHODS for b in (3, 4)]
    table = {k: {o: (rng.normal(0, 1.0 if i < 2 else 0.2, dims)).tolist() for o in options} for i, k in enumerate(keys)}
    effect = {(k, o): rng.normal(0, 0.1) for k in keys for o in options}
    records, learned = [], []
    for _ in range(n):
        choice = {k: options[rng.integers(len(options))] for k in keys}
        total = np.sum([table[k][o] for k, o in choice.items()], axis=0)
        learned.append(sum(effect[k, o] for k, o in choice.items()) + interaction(total) + rng.normal(0, 0.05))
        records.append({"config": {k: [o, 100, 30, 0.01] for k, o in choice.items()}})
    return records, np.array(learned), keys, table


def _signed_shift_records(n: int, seed: int, strength: float) -> tuple[list[dict], np.ndarray, list[str], dict]:
    """3-vector changes, ``strength`` x |summed change|^2: the summed signed changes add and cancel."""
    return _shift_records(n, seed, 3, lambda total: strength * float(total @ total))


@pytest.mark.parametrize("strength", [0.0, 0.3])
def test_shift_prior_holds_signed_cancellations_and_leaves_additive_data_to_the_others(strength):
    """With the output-change table, fit_prior's ridge_shift models |sum|^2 (held out far better than ridge)
    and its saved entry predicts through prior_values alone; on additive data the prior ranks as before."""
    from autobuild.ensemble import prior_values
    from autobuild.output_shift import shift_basis
    from autobuild.train import fit_prior, ridge_prior

    records, learned, keys, table = _signed_shift_records(260, seed=3, strength=strength)
    train, test = np.arange(200), np.arange(200, 260)
    basis = shift_basis(table, components=3)
    prior = fit_prior(records, learned, train, keys, seed=0, shift_basis=basis)
    plain = fit_prior(records, learned, train, keys, seed=0)
    held_out = [records[i] for i in test]
    prior = json.loads(json.dumps(prior))  # what an ensemble saves and reloads
    rho = srcc(prior_values(prior, held_out), torch.tensor(learned[test]))
    rho_ridge = srcc(prior_values(ridge_prior(records, learned, train, keys), held_out), torch.tensor(learned[test]))
    rho_plain = srcc(prior_values(plain, held_out), torch.tensor(learned[test]))
    if strength:
        assert prior["kind"] == "ridge_shift" and prior["shift"]["weight"] > 0
        assert rho > 0.95 and rho > rho_ridge + 0.1 and rho > rho_plain + 0.1, (rho, rho_ridge, rho_plain)
        # prior_values = one-hot part + the quadratic form of the saved basis, recomputed here from the table
        from autobuild.output_shift import ShiftBasis, quadratic_shift_features

        saved = ShiftBasis.from_json(prior["shift"]["basis"])
        manual = (encode_options(held_out, prior["columns"]) @ np.array(prior["coef"]) + prior["intercept"]
                  + quadratic_shift_features(held_out, saved) @ np.array(prior["shift"]["coef"]))
        np.testing.assert_allclose(prior_values(prior, held_out).numpy(), manual, rtol=1e-12)
        # the saved basis is rescaled so that the training records' summed coordinates have unit spread
        train_z = quadratic_shift_features([records[i] for i in train], saved)[:, :saved.components]
        assert train_z.std() == pytest.approx(1.0) and len(saved.coords) == len(basis.coords)
    else:
        assert rho > rho_plain - 0.02, (rho, rho_plain)


def _bump_records(n: int, seed: int, strength: float) -> tuple[list[dict], np.ndarray, list[str], dict]:
    """2-vector changes, - ``strength`` x cos(3 |summed change|): rings in the summed change that neither one-hot
    terms nor a quadratic form of it express."""
    return _shift_records(n, seed, 2, lambda total: -strength * np.cos(3.0 * np.linalg.norm(total)))


@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_shift_kernel_learns_the_interaction_an_additive_prior_misses_and_is_refused_without_one(strength):
    """fit_shift_kernel on an additive prior's cross-fitted residual: where log FID has rings in the summed output
    change it is kept and prior + kernel ranks held-out records far better than the prior; on additive data its
    inner CV does not beat no correction and it is refused (the prior alone). The saved entry predicts through
    prior_values after a JSON round trip, as a direct sum over its support."""
    from autobuild.ensemble import kernel_values, prior_values
    from autobuild.output_shift import shift_basis, summed_shift_coords
    from autobuild.train import _out_of_fold_prior, fit_prior, fit_shift_kernel

    records, learned, keys, table = _bump_records(200, seed=3, strength=strength)
    train, test = np.arange(150), np.arange(150, 200)
    basis = shift_basis(table, components=2)
    prior = fit_prior(records, learned, train, keys, seed=0, kinds=("ridge",))
    residual = learned - prior_values(prior, records).numpy()
    residual[train] = learned[train] - _out_of_fold_prior(records, learned, train, keys, 0, "ridge", []).numpy()
    kernel, inner, info = fit_shift_kernel(records, residual, train, basis, seed=0)
    held_out, y = [records[i] for i in test], torch.tensor(learned[test])
    rho_prior = srcc(prior_values(prior, held_out), y)
    if not strength:
        assert kernel is None and not info["kept"] and not inner.any(), info  # seen: cv gain -3.5e-4
        return
    assert info["kept"] and info["cv_mse"] < 0.5 * info["cv_mse_none"], info  # seen: 0.13 vs 0.53
    kernel = json.loads(json.dumps(kernel))  # what an ensemble saves and reloads
    rho = srcc(prior_values({**prior, "kernel": kernel}, held_out), y)
    assert rho > rho_prior + 0.3, (rho, rho_prior)  # seen: 0.91 vs 0.24
    z = summed_shift_coords(held_out[:3], basis) / kernel["spread"]
    direct = [sum(d * math.exp(-kernel["gamma"] * float(((zi - np.array(s)) ** 2).sum()))
                  for d, s in zip(kernel["dual"], kernel["support"])) for zi in z]
    np.testing.assert_allclose(kernel_values(kernel, held_out[:3]), direct, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rings", [0.0, 1.0])
def test_gnn_with_a_shift_signature_holds_its_shift_prior_and_beats_ridge(tmp_path, rings):
    """train_predictor given TrainOptions.shift_signature: every fold's prior is ridge_shift, the predictor
    (prior + GNN residual) ranks held-out records at least as well as that prior alone and far better than
    ridge, the recorded options name the table by hash, and the saved ensemble predicts new records. With
    ``rings`` in log FID (-cos of the summed change's length: no quadratic form has them) every fold also keeps a
    kernel residual (autobuild.train.fit_shift_kernel), saved in its prior, and ranks far better than without."""
    model, family, records = _synthetic_cache(160, seed=4)
    keys = [k for k in records[0]["config"]]
    options = sorted({r["config"][k][0] for r in records for k in keys})
    rng = np.random.default_rng(8)
    width = 2 if rings else 4  # rings in a plane: what 51 training records of a fold can map
    table = {k: {o: rng.normal(0, 1.0 if i < 2 else 0.1, width).tolist() for o in options} for i, k in enumerate(keys)}
    for r in records:
        total = np.sum([table[k][r["config"][k][0]] for k in keys], axis=0)
        ring = -rings * np.cos(3.0 * np.linalg.norm(total))
        r["FID-GT-1k"] = float(np.exp(2.0 + 0.4 * float(total @ total) + ring + rng.normal(0, 0.05)))
    opts = TrainOptions(hidden=16, patience=3, shift_signature=table, shift_components=width)
    metrics = train_predictor(records[:120], sequential_graph(model, family), "-1*FID-GT-1k", folds=2, epochs=4,
                              batch_size=64, seed=0, out_dir=tmp_path, options=opts, log=None)
    base = metrics["baselines"]
    assert [f["prior_kind"] for f in metrics["folds"]] == ["ridge_shift"] * 2
    assert metrics["srcc_mean"] >= base["prior_learned"]["srcc_mean"] - 0.02, (metrics["srcc_mean"], base)
    assert metrics["srcc_mean"] > base["ridge_learned"]["srcc_mean"] + 0.1, (metrics["srcc_mean"], base)
    kernels = [f["shift_kernel"] for f in metrics["folds"]]
    saved = json.loads((tmp_path / "ensemble.json").read_text())["folds"]
    if rings:
        assert all(k["kept"] for k in kernels) and all(f["prior"]["kernel"]["support"] for f in saved), kernels
        gain = metrics["srcc_mean"] - base["prior_no_kernel_learned"]["srcc_mean"]
        assert gain > 0.1, (metrics["srcc_mean"], base)  # seen: 0.937 vs 0.726
    recorded = json.loads((tmp_path / "metrics.json").read_text())["options"]["shift_signature"]
    assert recorded["entries"] == len(keys) * len(options) and recorded["width"] == width and len(recorded["sha256"]) == 64
    new = records[120:]
    pred = load_ensemble(tmp_path).predict(new)["pred"]
    assert srcc(torch.tensor(pred), torch.tensor([-r["FID-GT-1k"] for r in new])) > 0.8


def _synthetic_run_files(tmp_path, n: int, seed: int):
    """:func:`_synthetic_cache`'s records pickled as ``tmp_path/quant_cache.pkl`` and the tiny DiT's
    multiquantizer saved as ``tmp_path/mq.safetensors``: what train-predictor reads. Returns the records, the
    multiquantizer and both paths."""
    from multiquant.checkpoint import MultiQuantizer

    model, family, records = _synthetic_cache(n, seed=seed)
    mq = MultiQuantizer.build(model, family, methods=METHODS, bits=(3, 4), kmeans_iters=2, show_progress=False)
    mq_path, cache = tmp_path / "mq.safetensors", tmp_path / "quant_cache.pkl"
    mq.save_pretrained(mq_path)
    cache.write_bytes(pickle.dumps(records))
    return records, mq, cache, mq_path


def test_train_predictor_cli_measures_output_shifts_for_its_prior(tmp_path, capsys):
    """`train-predictor --output_shifts --mq M` measures the signature with the tiny model and that multiquantizer,
    trains with it and records it (by size and hash, not by value) in the options."""
    from qua2sedimo.cli import main

    records, mq, cache, mq_path = _synthetic_run_files(tmp_path, 40, seed=1)
    out = tmp_path / "run"
    assert main(["train-predictor", "--cache", str(cache), "--model", "dit", "--tiny", "--target", "-1*FID-GT-1k",
                 "--out", str(out), "--epochs", "2", "--folds", "2", "--hidden", "16", "--output_shifts",
                 "--mq", str(mq_path), "--shift_components", "4"]) == 0
    assert "output shifts of" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    recorded = metrics["options"]["shift_signature"]
    assert recorded["entries"] == len(records[0]["config"]) * len(mq.options) and recorded["width"] > 1
    assert metrics["options"]["shift_components"] == [4]
    kinds = {f["prior_kind"] for f in metrics["folds"]}
    assert kinds <= {"ridge", "lasso", "lasso_pairs", "ridge_shift"}
    assert load_ensemble(out).predict(records[:3])["pred"].shape == (3,)
