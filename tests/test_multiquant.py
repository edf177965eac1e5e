"""Layers, multiquantizer checkpoints, configurations and the inspect figures."""
import json
import pickle

import pytest
import torch

from multiquant.checkpoint import MultiQuantizer, MultiQuantizerMismatch
from qua2sedimo.cli import main as cli_main
from multiquant.config import (ConfigError, config_record, load_config, quantize_, sample_random_config, save_config,
                               uniform_config, validate_config)
from multiquant.families import BUILTIN_FAMILIES, get_family, list_families
from multiquant.layers import fp_bytes, quantizable_layers
from multiquant.safe_pickle import UnsafePickleError

REFERENCE = {"pixart_alpha": (1_220_456_448, 16), "pixart_sigma": (1_220_456_448, 16), "hunyuan": (2_999_291_904, 16),
             "sdxl": (5_131_760_640, 16), "dit": (1_433_972_736, 16), "sdv15": (3_436_308_480, 32)}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_inspect_full_size_reproduces_reference(name, capsys):
    assert cli_main(["inspect", "--model", name, "--full-size", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["fp_bytes"], info["fp_prec"]) == REFERENCE[name]
    assert info["model"] == name
    expected_layers = {"pixart_alpha": 287, "pixart_sigma": 287, "hunyuan": 487, "sdxl": 803, "sdv15": 294, "dit": 255}
    assert info["num_layers"] == expected_layers[name]


def test_dit_tied_copies_counted_once_in_corrected_figure():
    family = get_family("dit")
    layers = quantizable_layers(family.build("full", device="meta"), family)
    tied = [r for r in layers if r.tied_to]
    assert len(tied) == 27 * 2
    # 27 redundant copies of the 256->1152->1152 timestep MLP, 2 bytes per weight
    assert fp_bytes(layers, 16) - fp_bytes(layers, 16, dedup=True) == 27 * (256 * 1152 + 1152 * 1152) * 2


def test_hunyuan_rules():
    family = get_family("hunyuan")
    model = family.build("full", device="meta")
    layers = quantizable_layers(model, family)
    assert not any("pooler" in r.key for r in layers)
    halves = [r for r in layers if r.key.endswith("skip_linear.weight_quantizer_0")]
    assert len(halves) == 19 and all(r.cols == (1408, 2816) for r in halves)


@pytest.fixture(scope="module")
def tiny_pixart():
    family = get_family("pixart_alpha")
    model = family.build("tiny", seed=1)
    return family, model, MultiQuantizer.build(model, family, show_progress=False)


def test_checkpoint_round_trip(tmp_path, tiny_pixart):
    family, model, mq = tiny_pixart
    path = mq.save_pretrained(tmp_path)
    assert path.name == "pixart_alpha_mq.safetensors"
    assert not any(p.suffix in (".pkl", ".pt") for p in tmp_path.iterdir())
    loaded = MultiQuantizer.from_pretrained(path)
    loaded.check_compatible(model, family)
    assert loaded.table == json.loads(json.dumps(mq.table))
    for ref in mq.layers[:5]:
        for option in mq.options:
            assert torch.equal(loaded.dequantize(ref.key, option), mq.dequantize(ref.key, option))
    # the stored error is the error of the stored codes
    ref = mq.layers[0]
    w = ref.weight(model).detach().reshape(ref.channels, -1)
    w_hat = mq.dequantize(ref.key, "kmeans-3").reshape(ref.channels, -1).half()
    expected = float(((w.double() - w_hat.double()).abs() ** 2.4).sum() / w.shape[1])
    assert mq.table[ref.key]["kmeans-3"][3] == pytest.approx(expected, rel=1e-9)
    # packed codes: exactly b bits per weight for every option
    from multiquant.packing import packed_nbytes
    code_bytes = sum(t.numel() for k, t in loaded.tensors.items() if k.endswith("|codes"))
    assert code_bytes == sum(packed_nbytes(r.numel, int(o[-1])) for r in mq.layers for o in mq.options)


def test_checkpoint_rejects_other_model(tiny_pixart):
    family, model, mq = tiny_pixart
    other = family.build("tiny", seed=2)  # same structure, other weights
    with pytest.raises(MultiQuantizerMismatch, match="weights differ"):
        mq.check_compatible(other, family)
    with pytest.raises(MultiQuantizerMismatch, match="family"):
        mq.check_compatible(get_family("dit").build("tiny"), get_family("dit"))


def test_apply_config_in_place_and_restore(tiny_pixart):
    family, model, mq = tiny_pixart
    layers = mq.layers
    original = {r.key: r.weight(model).detach().clone() for r in layers}
    config = sample_random_config(layers, seed=0, index=3)
    quantize_(model, config, mq)
    for r in layers:
        assert torch.equal(r.weight(model), mq.dequantize(r.key, config[r.key], dtype=r.weight(model).dtype))
    quantize_(model, uniform_config(layers, "fp16"), mq)
    for r in layers:
        assert torch.equal(r.weight(model), original[r.key])


def test_random_configs_reproducible_and_tied():
    family = get_family("dit")
    layers = quantizable_layers(family.build("full", device="meta"), family)
    a = sample_random_config(layers, seed=5, index=17)
    assert a == sample_random_config(layers, seed=5, index=17)
    assert a != sample_random_config(layers, seed=5, index=18)
    for r in layers:
        if r.tied_to:
            assert a[r.key] == a[r.tied_to]
    low = sample_random_config(layers, 0, 0, a_l=1.0, a_u=1.0)
    assert all(v.endswith("-3") for v in low.values())
    assert {v.split("-")[0] for v in low.values()} == {"mse", "kmeans", "kmeans_all"}


def test_config_record_avg_bits_exact(tiny_pixart):
    family, model, mq = tiny_pixart
    config = uniform_config(mq.layers, "mse-4")
    rec = config_record(config, mq.table, 16, mq.fp_bytes)
    expected_size = sum((r.numel * 4) // 8 + (2 * r.channels * 16) // 8 for r in mq.layers)
    assert rec["quantized_size"] == expected_size
    assert rec["avg_bits"] == 16 * expected_size / mq.fp_bytes
    assert config_record(uniform_config(mq.layers, "fp16"), mq.table, 16, mq.fp_bytes)["avg_bits"] == 16.0


def test_config_files_round_trip(tmp_path, tiny_pixart):
    _, _, mq = tiny_pixart
    config = sample_random_config(mq.layers, 1, 2)
    save_config(config, tmp_path / "c.pkl")
    assert load_config(tmp_path / "c.pkl") == config == load_config(tmp_path / "c.json")
    with open(tmp_path / "c.pkl", "rb") as f:
        assert pickle.load(f) == dict(config)  # the reference's plain-dict form


def test_malicious_config_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"a": Evil()}))
    with pytest.raises(UnsafePickleError):
        load_config(tmp_path / "evil.pkl")


def test_bad_configs_name_the_layer(tiny_pixart):
    _, _, mq = tiny_pixart
    layers = mq.layers
    good = uniform_config(layers, "mse-4")
    key = layers[3].key
    with pytest.raises(ConfigError, match="model.nope"):
        validate_config({**good, "model.nope.weight_quantizer": "mse-4"}, layers)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config({**good, key: "mse"}, layers)
    with pytest.raises(ConfigError, match="not in the multiquantizer"):
        validate_config({**good, key: "kmeans-2"}, layers, options=mq.options)
    missing = dict(good)
    del missing[key]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(missing, layers)
    assert validate_config(missing, layers, fill="fp16")[key] == "fp16"


# Built-in families only: toy user families registered by other test modules have layers too small for this range.
@pytest.mark.parametrize("name", sorted(BUILTIN_FAMILIES - {"mnist_dit"}))
def test_tiny_model_of_every_family_builds_a_multiquantizer(name):
    family = get_family(name)
    model = family.build("tiny")
    mq = MultiQuantizer.build(model, family, bits=(3,), methods=("mse", "kmeans_all"), show_progress=False)
    layers = quantizable_layers(model, family)
    assert set(mq.table) == {r.key for r in layers}
    rec = config_record(uniform_config(layers, "mse-3"), mq.table, family.fp_prec, fp_bytes(layers, family.fp_prec))
    assert 3.0 < rec["avg_bits"] < 4.5


def test_tiny_build_never_overwrites_the_real_checkpoint(tmp_path, monkeypatch, tiny_pixart):
    """`multiquantizer --tiny` writes <model>_tiny_mq; a checkpoint of other weights is kept unless --overwrite."""
    from multiquant.paths import constants
    from multiquant.errors import UserError

    family, model, mq = tiny_pixart
    real = mq.save_pretrained(tmp_path)  # stands in for the shipped checkpoint of the real weights
    before = real.read_bytes()
    monkeypatch.setattr(constants, "MULTIQUANTIZER_DIR", tmp_path)
    args = ["multiquantizer", "--model", "pixart_alpha", "--tiny", "--bits", "3", "--device", "cpu"]
    assert cli_main(args) == 0
    assert real.read_bytes() == before
    tiny = MultiQuantizer.from_pretrained(tmp_path / "pixart_alpha_tiny_mq.safetensors")
    assert tiny.manifest["weight_hash"] != mq.manifest["weight_hash"]
    # writing the other weights to the real name is refused, then allowed when asked
    with pytest.raises(UserError, match="other weights.*--overwrite"):
        tiny.save_pretrained(real)
    assert real.read_bytes() == before
    assert cli_main(args + ["--out", str(real)]) == 2
    assert real.read_bytes() == before
    assert cli_main(args + ["--out", str(real), "--overwrite"]) == 0
    assert MultiQuantizer.from_pretrained(real).manifest["weight_hash"] == tiny.manifest["weight_hash"]
    mq.save_pretrained(tmp_path / "same.safetensors")  # the same weights may be rebuilt in place
    mq.save_pretrained(tmp_path / "same.safetensors")


def test_quantize_returns_the_handle_that_switches_and_restores(tiny_pixart):
    from multiquant.config import ConfigApplier, applier_of

    family, _, mq = tiny_pixart
    model = family.build("tiny", seed=1)
    fp = {r.key: r.weight(model).detach().clone() for r in mq.layers}
    first = sample_random_config(mq.layers, seed=0, index=1)
    handle = quantize_(model, first, mq)
    assert isinstance(handle, ConfigApplier) and handle.model is model and applier_of(model) is handle
    assert dict(handle.current) == dict(validate_config(first, mq.layers))
    # a second configuration reuses the handle: the FP copy is the original, not the quantized weights
    assert quantize_(model, sample_random_config(mq.layers, seed=0, index=2), mq) is handle
    handle.restore()
    assert all(torch.equal(r.weight(model), fp[r.key]) for r in mq.layers)
