"""Per-node output-change features of the predictor (autobuild.data.GraphTemplate.shift_coords, autobuild.gnn.
ShiftReadout): each layer node reads its option's measured output change, and the GNN's shift readout sums them
per configuration."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autobuild.data import GraphTemplate, cache_to_dataset
from autobuild.gnn import SensitivityGNN
from autobuild.losses import srcc
from autobuild.train import TrainOptions, load_ensemble, train_predictor
from test_predictor import _hand_graph, _hand_record, _synthetic_cache

KEYS = ["model.in.weight_quantizer", "model.b.0.q.weight_quantizer", "model.b.0.k.weight_quantizer",
        "model.b.0.out.weight_quantizer"]
OPTIONS = ["mse-3", "mse-4", "kmeans-3", "kmeans-4", "kmeans_all-3", "kmeans_all-4"]


def _coords(seed: int, width: int = 3) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    return {f"{k}={o}": rng.normal(0, 1, width).tolist() for k in KEYS for o in OPTIONS}


def _random_configs(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        options = {k: (OPTIONS + ["fp16"])[rng.integers(len(OPTIONS) + 1)] for k in KEYS}
        options["model.b.1.k.weight_quantizer"] = options["model.b.0.k.weight_quantizer"]  # the tied alias
        records.append(_hand_record(options, rng))
    return records


def test_layer_nodes_read_their_options_output_change_and_the_template_keeps_it():
    coords = _coords(1)
    template = GraphTemplate.from_graph(_hand_graph(), shift_coords=coords)
    plain = GraphTemplate.from_graph(_hand_graph())
    assert template.shift_dim == 3 and template.num_numeric == 5 and plain.num_numeric == 2
    records = _random_configs(6, seed=2)
    records[0]["config"]["model.b.0.q.weight_quantizer"][0] = "fp16"
    for record in records:
        _, numeric = template.encode(record["config"])
        _, base = plain.encode(record["config"])
        assert numeric.shape == (6, 5)
        torch.testing.assert_close(numeric[:, :2], base)  # the first two features are unchanged
        for i, key in enumerate(template.keys):
            option = record["config"][key][0] if key else None
            want = coords.get(f"{key}={option}", [0.0] * 3)  # FP layers and combine nodes: no change
            np.testing.assert_allclose(numeric[i, 2:].numpy(), want, rtol=1e-6)
    again = GraphTemplate.from_json(json.loads(json.dumps(template.to_json())))
    assert again.shift_coords == template.shift_coords
    torch.testing.assert_close(again.encode(records[1]["config"])[1], template.encode(records[1]["config"])[1])
    assert GraphTemplate.from_json(json.loads(json.dumps(plain.to_json()))).shift_coords is None
    with pytest.raises(ValueError, match="same, non-zero length"):
        GraphTemplate.from_graph(_hand_graph(), shift_coords={"a=mse-3": [1.0], "b=mse-3": [1.0, 2.0]})


def test_unit_scoring_encodes_variants_like_training():
    """autobuild.scores builds the features of unit variants from an option table: with shift coordinates they
    must be what GraphTemplate.encode gives the same configuration."""
    from autobuild.scores import _variant_features
    from multiquant.options import OptionTable

    coords = _coords(3)
    template = GraphTemplate.from_graph(_hand_graph(), shift_coords=coords)
    record = _random_configs(1, seed=4)[0]
    table = OptionTable({k: {o: [o, 2000, 1000, 0.01 * (j + 1)] for j, o in enumerate(OPTIONS)} for k in KEYS})
    variants = np.array([[j % 6, (j + 1) % 6, (j + 2) % 6, (j + 3) % 6] for j in range(6)], dtype=np.uint8)
    codes, numeric = _variant_features(template, table, OPTIONS, variants)
    for j, row in enumerate(variants):
        config = {k: table.table[k][OPTIONS[o]] for k, o in zip(KEYS, row)}
        config["model.b.1.k.weight_quantizer"] = config["model.b.0.k.weight_quantizer"]
        want_codes, want_numeric = template.encode({**record["config"], **config})
        torch.testing.assert_close(numeric[j], want_numeric)
        torch.testing.assert_close(codes[j], want_codes)


def test_shift_readout_is_the_summed_change_over_layer_nodes_and_reads_message_passing():
    coords = _coords(5)
    template = GraphTemplate.from_graph(_hand_graph(), shift_coords=coords)
    records = _random_configs(4, seed=6)
    batch = cache_to_dataset(records, template).collate()
    torch.manual_seed(0)
    model = SensitivityGNN(template.num_ops, template.num_blocks, hidden=8, layers=2, shift_dim=3).eval()
    hs = model.hop_embeddings(batch)
    summed = model.shift_readout(batch.x_num[:, 2:], hs[-1], batch.hop_mask[:, 0], batch.batch, batch.num_graphs)
    want = np.zeros((4, 3))  # float64 by hand: the canonical key's change, once per layer node
    for g, record in enumerate(records):
        for key in KEYS:
            want[g] += coords.get(f"{key}={record['config'][key][0]}", [0.0] * 3)
    np.testing.assert_allclose(summed.detach().double().numpy(), want, rtol=1e-5, atol=1e-6)
    # the correction is a linear map of the last hop's node embeddings, summed over the same nodes
    with torch.no_grad():
        model.shift_readout.correction.weight.normal_()
        corrected = model.shift_readout(batch.x_num[:, 2:], hs[-1], batch.hop_mask[:, 0], batch.batch, 4)
        layer = batch.hop_mask[:, 0]
        extra = torch.stack([model.shift_readout.correction(hs[-1][(batch.batch == g) & layer]).sum(0)
                             for g in range(4)])
    torch.testing.assert_close(corrected, summed + extra)
    assert model(batch)["pred"].shape == (4,)
    with pytest.raises(ValueError, match=r"x_num \[N, 5\]"):
        model(cache_to_dataset(records, GraphTemplate.from_graph(_hand_graph())).collate())


def test_gnn_with_node_shifts_learns_cancelling_output_changes(tmp_path):
    """log FID = 1.5 |s|, s the configurations' summed 1-D output change: signed changes of different layers
    cancel, which no per-layer term expresses, and the GNN's shift readout does. Without a prior, on the same folds, the GNN
    with node shifts ranks held-out records far better than the same GNN without them; the saved ensemble keeps
    the coordinates and predicts new records through them."""
    from autobuild.data import sequential_graph

    model, family, records = _synthetic_cache(170, seed=7)
    graph = sequential_graph(model, family)
    canonical = [k for k in GraphTemplate.from_graph(graph).keys if k]
    options = sorted({r["config"][k][0] for r in records for k in canonical})
    rng = np.random.default_rng(9)
    # a tied layer's change is measured with the layer it follows (autobuild.output_shift): zero of its own
    table = {k: {o: [float(rng.normal(0, 1.0 / np.sqrt(len(canonical)))) if k in canonical else 0.0]
                 for o in options} for k in records[0]["config"]}
    for r in records:
        s = sum(table[k][r["config"][k][0]][0] for k in canonical)
        r["FID-GT-1k"] = float(np.exp(2.0 + 1.5 * abs(s) + rng.normal(0, 0.02)))
    results = {}
    for node_shifts in (True, False):
        opts = TrainOptions(hidden=16, patience=20, lr=3e-3, linear_prior=False, shift_signature=table,
                            shift_components=1, node_shifts=node_shifts)
        out = tmp_path / str(node_shifts)
        results[node_shifts] = train_predictor(records[:140], graph, "-1*FID-GT-1k", folds=2, epochs=12,
                                               batch_size=32, seed=0, out_dir=out, options=opts, log=None)
    assert results[True]["srcc_mean"] > results[False]["srcc_mean"] + 0.2, (
        results[True]["srcc_mean"], results[False]["srcc_mean"])
    ensemble = load_ensemble(tmp_path / "True")
    assert ensemble.models[0].config["shift_dim"] == 1 and ensemble.template.shift_dim == 1
    new = records[140:]
    pred = ensemble.predict(new)["pred"]
    assert srcc(torch.tensor(pred), torch.tensor([-r["FID-GT-1k"] for r in new])) > 0.5


def test_train_predictor_measures_output_shifts_by_default_and_says_when_it_cannot(tmp_path, capsys):
    """Plain `train-predictor` measures the signature when the multiquantizer exists (recorded in metrics.json,
    the layer nodes read it); a missing one is said and recorded, and is an error only with --output_shifts;
    --no_output_shifts never measures."""
    from qua2sedimo.cli import main
    from test_predictor import _synthetic_run_files

    records, mq, cache, mq_path = _synthetic_run_files(tmp_path, 40, seed=2)
    common = ["train-predictor", "--cache", str(cache), "--model", "dit", "--tiny", "--target", "-1*FID-GT-1k",
              "--epochs", "2", "--folds", "2", "--hidden", "16", "--shift_components", "3"]

    def options(out):
        return json.loads((out / "metrics.json").read_text())["options"]

    assert main(common + ["--out", str(tmp_path / "a"), "--mq", str(mq_path)]) == 0
    assert "output shifts of" in capsys.readouterr().out
    recorded = options(tmp_path / "a")
    assert recorded["shift_source"]["measured"] is True and recorded["shift_signature"]["width"] > 1
    assert recorded["shift_source"]["multiquantizer_content_hash"] == mq.content_hash
    ensemble = load_ensemble(tmp_path / "a")
    assert ensemble.models[0].config["shift_dim"] == 3 and ensemble.template.shift_dim == 3
    assert ensemble.predict(records[:3])["pred"].shape == (3,)

    missing = str(tmp_path / "none.safetensors")
    assert main(common + ["--out", str(tmp_path / "b"), "--mq", missing]) == 0
    assert "output shifts not measured" in capsys.readouterr().out
    recorded = options(tmp_path / "b")
    assert recorded["shift_source"]["measured"] is False and "none.safetensors" in recorded["shift_source"]["reason"]
    assert recorded["shift_signature"] is None and load_ensemble(tmp_path / "b").template.shift_dim == 0
    assert main(common + ["--out", str(tmp_path / "c"), "--mq", missing, "--output_shifts"]) == 2
    assert "none.safetensors" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "d"), "--mq", str(mq_path),
                          "--no_output_shifts"]) == 0
    assert options(tmp_path / "d")["shift_source"] == {"measured": False, "reason": "--no_output_shifts"}
    # a denoiser above the default's size limit is measured only when asked for
    from autobuild.train_predictor import measured_signature

    signature, source = measured_signature("dit", None, mq=mq_path, tiny=True, log=print,
                                           max_params=10)
    assert signature is None and source["measured"] is False and "parameters" in source["reason"]
    signature, source = measured_signature("dit", True, mq=mq_path, tiny=True, log=print,
                                           max_params=10)
    assert source["measured"] is True and len(signature) == len(records[0]["config"])


def test_shift_prior_picks_its_number_of_components_by_inner_cv():
    """Two candidate bases: log FID depends on all 3 coordinates of the summed change, so the inner CV picks the
    3-component basis over the 1-component one; its refits (cross-fit, final) use that basis."""
    from autobuild.output_shift import shift_basis
    from autobuild.train import _basis_of_prior, _bases_of, fit_prior
    from test_predictor import _signed_shift_records

    records, learned, keys, table = _signed_shift_records(200, seed=5, strength=0.3)
    bases = _bases_of(TrainOptions(shift_signature=table, shift_components=(1, 3, 64)))
    assert [b.components for b in bases] == [1, 3]  # 64 is above the table's rank: the same basis as 3
    prior = fit_prior(records, learned, np.arange(200), keys, seed=0, kinds=("ridge_shift",), shift_basis=bases)
    assert len(prior["shift"]["basis"]["coords"][f"{keys[0]}=mse-3"]) == 3
    assert [b.components for b in _basis_of_prior(prior, bases)] == [3]
    one = fit_prior(records, learned, np.arange(200), keys, seed=0, kinds=("ridge_shift",),
                    shift_basis=shift_basis(table, 1))
    assert prior["cv_mse"]["ridge_shift"] < one["cv_mse"]["ridge_shift"]
