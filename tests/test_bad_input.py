"""Every bad input of the issue list gets one line naming the problem and the fix, exit code 2, no traceback.

The command line is driven in-process (``qua2sedimo.cli.main``: what the console script runs)
and once as a real subprocess, to see what a user sees on stderr."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from qua2sedimo.cli import main as cli_main
from multiquant.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _record(i: int, fid=12.5) -> dict:
    return {"config": OrderedDict(a=["mse-4", 100, 30, 0.01]), "quantized_size": 30, "quantized_error": 0.01,
            "FID-GT-1k": fid if not isinstance(fid, float) else np.float64(fid), "avg_bits": 4.8, "index": i}


def _one_line_error(capsys, argv, *needles) -> str:
    code = cli_main(argv)
    captured = capsys.readouterr()
    lines = [l for l in captured.err.strip().splitlines() if l.strip()]
    assert code == 2, (code, captured.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def pkl(tmp_path):
    def write(name, obj=None, raw=None):
        path = tmp_path / name
        path.write_bytes(raw if raw is not None else pickle.dumps(obj, protocol=4))
        return str(path)
    return write


def test_bad_caches_for_train_predictor(capsys, pkl, tmp_path):
    good = pickle.dumps([_record(i) for i in range(3)], protocol=4)
    cases = {
        "unsafe": (pkl("unsafe.pkl", [_Evil()]), "refusing to unpickle global"),
        "truncated": (pkl("cut.pkl", raw=good[: len(good) // 2]), "not a complete pickle"),
        "empty": (pkl("empty.pkl", raw=b""), "is empty"),
        "missing": (str(tmp_path / "nope.pkl"), "does not exist"),
        "non-dict record": (pkl("nondict.pkl", [_record(0), ["not", "a", "dict"]]), "record 1 is a list, not a dict"),
        "string FID": (pkl("strfid.pkl", [_record(0), _record(1, fid="12.5")]), "record 1 FID-GT-1k is '12.5'"),
        "negative FID": (pkl("negfid.pkl", [_record(0, fid=-3.0)]), "negative"),
        "duplicate index": (pkl("dup.pkl", [_record(0), _record(0)]), "both carry index 0"),
        "no config": (pkl("noconf.pkl", [{"FID-GT-1k": 1.0}]), "has no 'config'"),
        "not a list": (pkl("dict.pkl", {"a": 1}), "not a quant_cache list"),
    }
    for name, (path, needle) in cases.items():
        _one_line_error(capsys, ["train-predictor", "--cache", path, "--model", "dit", "--out", str(tmp_path / "o")],
                        needle, Path(path).name)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def three_records(tmp_path_factory):
    from test_predictor import _synthetic_cache

    _, _, records = _synthetic_cache(3, seed=4)
    path = tmp_path_factory.mktemp("cache") / "quant_cache.pkl"
    path.write_bytes(pickle.dumps(records, protocol=4))
    return str(path)


def test_train_predictor_failures(capsys, three_records, tmp_path):
    base = ["train-predictor", "--cache", three_records, "--size", "tiny", "--out", str(tmp_path / "o")]
    # the real cause (too few records for the folds), not "only 3 of 3 records have a finite target"
    line = _one_line_error(capsys, [*base, "--model", "dit"], "3 records are too few for 5-fold", "--folds")
    assert "finite" not in line
    _one_line_error(capsys, [*base, "--model", "dit", "--target", "(" * 300 + "avg_bits" + ")" * 300],
                    "target expression")
    _one_line_error(capsys, [*base, "--model", "dit", "--target", "-" * 400 + "avg_bits"], "nested too deeply")
    _one_line_error(capsys, [*base, "--model", "dit", "--target", "9" * 400 + "*avg_bits"], "too large for a float")
    _one_line_error(capsys, [*base, "--model", "dit", "--target", "__import__('os')"], "target")
    _one_line_error(capsys, [*base, "--model", "no_such_family"], "unknown model family 'no_such_family'")


def test_report_and_build_config_failures(capsys, tmp_path):
    _one_line_error(capsys, ["report", "--predictor", str(tmp_path / "none"), "--out", str(tmp_path / "r")],
                    "holds no trained predictor")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ensemble.json").write_text("{not json")
    _one_line_error(capsys, ["report", "--predictor", str(tmp_path / "bad"), "--out", str(tmp_path / "r")],
                    "not valid JSON")


def _sens(layers) -> dict:
    return {"settings": {"model": "pixart_alpha", "tiny": True, "method": "mse"}, "layers": layers}


def _flops(layers) -> dict:
    return {"model": "pixart_alpha", "tiny": True, "fp_prec": 16, "layers": layers}


def test_malformed_sensitivity_and_flops_files(capsys, tmp_path):
    good_layer = {"key": "a", "numel": 64, "channels": 8, "macs": 100.0, "tied_to": None}
    flops = tmp_path / "flops.json"
    flops.write_text(json.dumps(_flops([good_layer])))
    cases = {
        "null sensitivity": (json.dumps(_sens([{"key": "a", "sensitivity": None}])), None, "not a finite number"),
        "string sensitivity": (json.dumps(_sens([{"key": "a", "sensitivity": "high"}])), None, "not a finite number"),
        "layers not dicts": (json.dumps(_sens([["a", 1.0]])), None, "layers[0] needs a string 'key'"),
        "settings a list": (json.dumps({"settings": [], "layers": []}), None, "not a sensitivity file"),
        "duplicate JSON key": ('{"settings": {"model": "x"}, "settings": {}, "layers": []}', None, "twice"),
        "invalid JSON": ('{"settings": ', None, "not valid JSON"),
        "top-level list": ("[]", None, "must hold a JSON object"),
        "flops numel string": (json.dumps(_sens([{"key": "a", "sensitivity": 1.0}])),
                               json.dumps(_flops([dict(good_layer, numel="64")])), "positive integer 'numel'"),
        "flops layers null": (json.dumps(_sens([{"key": "a", "sensitivity": 1.0}])),
                              json.dumps({"model": "pixart_alpha", "layers": None}), "not a FLOPs file"),
        "flops duplicate layer": (json.dumps(_sens([{"key": "a", "sensitivity": 1.0}])),
                                  json.dumps(_flops([good_layer, good_layer])), "listed twice"),
    }
    for name, (sens_text, flops_text, needle) in cases.items():
        sens = tmp_path / "sens.json"
        sens.write_text(sens_text)
        f = flops
        if flops_text is not None:
            f = tmp_path / "flops_bad.json"
            f.write_text(flops_text)
        _one_line_error(capsys, ["optimize-mixed-precision", "--sensitivity_file", str(sens), "--flops_file", str(f),
                                 "--budget_bits", "4", "--outdir", str(tmp_path / "mp")], needle)


def test_bad_checkpoints_and_configs(capsys, tmp_path):
    shipped = ROOT / "multiquantizers" / "mnist_dit_mq.safetensors"
    raw = shipped.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 3])
    _one_line_error(capsys, ["export-table", "--checkpoint", str(tmp_path / "cut.safetensors"), "--out",
                             str(tmp_path / "t.json")], "truncated or damaged", "rebuild it")
    _one_line_error(capsys, ["export-table", "--checkpoint", str(tmp_path / "typo.safetensors"), "--out",
                             str(tmp_path / "t.json")], "does not exist")
    from multiquant.config import load_config

    (tmp_path / "empty_entry.json").write_text(json.dumps({"layer.a": []}))
    (tmp_path / "dup.json").write_text('{"layer.a": "mse-4", "layer.a": "mse-3"}')
    (tmp_path / "number.json").write_text(json.dumps({"layer.a": 4}))
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps({"layer.a": "mse-4"})[:-3])
    for name, needle in (("empty_entry.json", "every value must be an option string"), ("dup.json", "twice"),
                         ("number.json", "every value must be an option string"), ("cut.pkl", "not a complete")):
        with pytest.raises(UserError, match=needle) as info:
            load_config(tmp_path / name)
        assert "\n" not in str(info.value)


def test_the_console_entry_prints_one_line_and_exit_2(tmp_path):
    """What a user sees: a real process, stderr one line, no traceback (a mistyped --mq never builds)."""
    (tmp_path / "empty.pkl").write_bytes(b"")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # torch's own noise
    proc = subprocess.run([sys.executable, "-m", "qua2sedimo.cli", "train-predictor", "--cache",
                           str(tmp_path / "empty.pkl"), "--model", "dit", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'empty.pkl'} is empty: re-create it "
                                                f"(an interrupted copy or write leaves empty files)"]


def test_multiquantizer_refuses_a_non_positive_chunk_size(capsys, tmp_path):
    _one_line_error(capsys, ["multiquantizer", "--model", "pixart_alpha", "--tiny", "--device", "cpu",
                             "--chunk_elements", "0", "--out", str(tmp_path / "mq")], "--chunk_elements", "positive")
    assert not (tmp_path / "mq").exists()
