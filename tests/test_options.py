"""The option vocabulary (multiquant.options): parsing, the method registry, sizes, and the shipped files."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from multiquant.errors import UserError
from multiquant.options import (FP_OPTION, METHOD_NAMES, METHODS, Option, OptionError, OptionTable, avg_bits_of,
                                option_of, options_for, size_budget)

ROOT = Path(__file__).resolve().parents[1]


def test_parse_and_format_round_trip_every_option():
    for method in METHOD_NAMES:
        for bits in range(2, 9):
            text = f"{method}-{bits}"
            option = Option.parse(text)
            assert (option.method, option.bits, str(option)) == (method, bits, text)
            assert Option.parse(option) is option
    fp = Option.parse("fp16")
    assert fp.is_fp and fp.bits == 16 and str(fp) == FP_OPTION == "fp16"
    assert Option.of_bits("kmeans", 16) == fp and Option.of_bits("kmeans", 3) == Option("kmeans", 3)


def test_malformed_options_are_user_errors():
    for bad in ("mse", "mse-", "-4", "mse-1", "mse-9", "mse-16", "kmeans_all-x", "uaq-4", "MSE-4", " mse-4", "fp32",
                "combine-4", "", "fp16-16"):
        with pytest.raises(OptionError) as err:
            Option.parse(bad)
        assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
        assert "\n" not in str(err.value)
    with pytest.raises(OptionError):
        Option("mse", True)  # a bool is not a width
    with pytest.raises(OptionError):
        Option(None, 8)


def test_lenient_parse_takes_other_spellings_of_fp():
    for text in ("fp", "FP32", " bf16 ", "none", "fp-16", "fp16-16", "kmeans-16", "Mse-16"):
        assert Option.parse(text, lenient=True).is_fp
    assert Option.parse(" KMeans_All-3 ", lenient=True) == Option("kmeans_all", 3)
    for bad in ("combine-16", "mse-9", "foo-4", "mse"):
        with pytest.raises(OptionError):
            Option.parse(bad, lenient=True)


def test_registry_names_and_tables():
    assert METHOD_NAMES == ("mse", "kmeans", "kmeans_all")
    assert [METHODS[m].label for m in METHOD_NAMES] == ["UAQ", "K-Means-C", "K-Means-A"]
    assert Option.parse("kmeans-3").label == "K-Means-C 3-bit" and Option.parse("mse-4").label == "UAQ 4-bit"
    assert [METHODS[m].params for m in METHOD_NAMES] == [("scale", "zero"), ("codebook",), ("codebook",)]
    assert [METHODS[m].table_rows(7) for m in METHOD_NAMES] == [7, 7, 1]
    # the matmul sees b bits for UAQ, FP16 after a K-Means lookup
    assert [Option.parse(o).gemm_bits for o in ("mse-3", "kmeans-3", "kmeans_all-4", "fp16")] == [3, 16, 16, 16]


def test_sizes_by_hand_including_one_weight_per_channel():
    # 3 output channels of 1 weight each (a 1x1 depthwise conv), 2 bits, fp16 tables
    assert Option("mse", 2).nbytes(3, 3, 16) == 0 + 2 * 3 * 2  # int(6/8) code bytes + scale/zero per channel
    assert Option("kmeans", 2).nbytes(3, 3, 16) == 0 + 4 * 3 * 2  # a 4-entry codebook per channel
    assert Option("kmeans_all", 2).nbytes(3, 3, 16) == 0 + 4 * 2  # one codebook
    assert Option(None, 16).nbytes(3, 3, 16) == 6 and Option(None, 16).nbytes(3, 3, 32) == 12
    # Conv1d 5->7, kernel 3 at fp32: 105 weights
    assert Option("kmeans", 5).nbytes(105, 7, 32) == 105 * 5 // 8 + 32 * 7 * 4


def test_sort_key_is_the_multiquantizer_order():
    options = options_for(METHOD_NAMES, (4, 3))
    assert options == ["mse-4", "kmeans-4", "kmeans_all-4", "mse-3", "kmeans-3", "kmeans_all-3"]
    shuffled = [*options, FP_OPTION]
    random.Random(0).shuffle(shuffled)
    assert sorted(shuffled, key=lambda o: Option.parse(o).sort_key()) == [*options, FP_OPTION]


def test_option_table_record_by_hand():
    table = {"a": {"mse-4": ["mse-4", 200, 60, 0.25], "kmeans-3": ["kmeans-3", 200, 50, 0.5]},
             "b": {"mse-4": ["mse-4", 100, 30, 0.125], "kmeans-3": ["kmeans-3", 100, 20, 1.0]}}
    t = OptionTable(table, 16)
    assert t.options == ["mse-4", "kmeans-3"] and t.fp_bytes == 300
    rec = t.record({"a": "kmeans-3", "b": "fp16"})
    assert rec["config"] == {"a": ["kmeans-3", 200, 50, 0.5], "b": ["fp16", 100, 100, 0.0]}
    assert rec["quantized_size"] == 150 and rec["quantized_error"] == 0.5
    assert rec["avg_bits"] == 16 * 150 / 300 == t.avg_bits({"a": "kmeans-3", "b": "fp16"}) == 8.0
    assert t.record({"a": "mse-4", "b": "mse-4"}, fp_bytes=600)["avg_bits"] == 16 * 90 / 600
    assert t.min_avg_bits() == 16 * 70 / 300
    assert size_budget(t.avg_bits({"a": "kmeans-3", "b": "mse-4"}), t.fp_bytes, 16) == 80  # exact at the edge
    assert avg_bits_of(80, 300, 16) == 16 * 80 / 300 and size_budget(16 * 79.99 / 300, 300, 16) == 79


# ------------------------------------------------------------------------------------------ shipped files
@pytest.fixture(scope="module", params=["mnist_dit", "mnist_unet"])
def shipped(request):
    from multiquant.checkpoint import MultiQuantizer
    from multiquant.store import load_quant_cache

    mq = MultiQuantizer.from_pretrained(ROOT / "multiquantizers" / f"{request.param}_mq.safetensors")
    records = load_quant_cache(ROOT / "quant_caches" / request.param / "quant_cache.pkl")
    return mq, records


def test_shipped_table_is_the_storage_formula(shipped):
    mq, _ = shipped
    assert mq.options == options_for(METHOD_NAMES, (4, 3))
    for ref in mq.layers:
        for text, entry in mq.table[ref.key].items():
            assert entry[0] == text
            assert entry[1] == Option(None, 16).nbytes(ref.numel, ref.channels, mq.fp_prec)
            assert entry[2] == Option.parse(text).nbytes(ref.numel, ref.channels, mq.fp_prec)


def test_shipped_records_recompute_exactly(shipped):
    """avg_bits, quantized_size (and the per-layer entries) of every shipped record, recomputed from the
    shipped multiquantizer, equal the stored values exactly."""
    mq, records = shipped
    table = OptionTable.from_source(mq)
    assert len(records) == 500 and table.fp_bytes == mq.fp_bytes
    for record in records:
        config = {key: option_of(entry) for key, entry in record["config"].items()}
        again = table.record(config, mq.fp_bytes)
        assert again["config"] == record["config"]
        assert again["quantized_size"] == record["quantized_size"]
        assert again["avg_bits"] == record["avg_bits"] == table.avg_bits(config)
        assert again["quantized_error"] == record["quantized_error"] == math.fsum(e[3] for e in record["config"].values())
    # the table the records carry is the multiquantizer's
    assert OptionTable.from_records(records, mq.fp_prec).table == {k: dict(v) for k, v in mq.table.items()}


def test_shipped_run_meta_names_the_shipped_checkpoint(shipped):
    """The dataset's run metadata names the checkpoint its records were scored with (the records' per-layer
    errors are that checkpoint's, above) by content hash and weights hash, the keys a resumed run compares."""
    mq, _ = shipped
    for name in ("run_meta.json", "baselines_run_meta.json"):
        path = ROOT / "quant_caches" / mq.family / name
        if path.exists():
            meta = json.loads(path.read_text())
            assert meta["model"] == mq.family
            assert meta["multiquantizer_content_hash"] == mq.content_hash
            assert meta["weights_hash"] == mq.manifest["weight_hash"]


def test_shipped_configs_load_and_match_the_search_results(shipped):
    from multiquant.config import load_config, validate_config

    mq, _ = shipped
    if mq.family != "mnist_dit":
        pytest.skip("searched configurations are shipped for mnist_dit only")
    table = OptionTable.from_source(mq)
    best = json.loads((ROOT / "benchmarks" / "results" / "pareto_mnist_dit_search.json").read_text())["best"]
    for tag, budget in (("33", "3.3"), ("35", "3.5"), ("37", "3.7")):
        stem = ROOT / "quant_configs" / f"mnist_dit_{tag}_search"
        config = validate_config(load_config(stem.with_suffix(".pkl")), mq.layers, options=mq.options)
        assert config == load_config(stem.with_suffix(".json"))
        assert dict(config) == best[budget]["config"]
        assert table.avg_bits(config) == best[budget]["avg_bits"] <= float(budget)
