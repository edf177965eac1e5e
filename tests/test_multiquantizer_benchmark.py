"""benchmarks/multiquantizer.py on tiny families, on the CPU: the keys the issue's checks read are there, every
listed family is built, and the batched build's option-table errors equal the layer-by-layer build's."""
from __future__ import annotations

import json
from benchmark_script import load_benchmark



def _benchmark():
    return load_benchmark("multiquantizer")


def test_tiny_families_build_with_the_reference_family_compared(tmp_path, one_thread):
    _benchmark().main(["--models", "pixart_alpha,hunyuan", "--sample_channels", "1", "--apply_trials", "1",
                       "--chunk_sweep", "64", "--profile", "--repeats", "2", "--host_copies", "both",
                       "--out", str(tmp_path)])
    result = json.loads((tmp_path / "multiquantizer.json").read_text())
    assert result["model"] == "pixart_alpha" and result["reference_model"] == "pixart_alpha"
    assert set(result["build_seconds_by_family"]) == {"hunyuan", "pixart_alpha"} and result["not_built"] == []
    assert result["build_seconds"] == result["families"]["pixart_alpha"]["build_seconds"] > 0
    assert result["sdxl_build_seconds"] is None and "device" in result
    # --repeats 2 --host_copies both: the first build and one more of each path, every rebuild the same tensors
    assert result["build_seconds_repeats"][0] == result["build_seconds"] and len(result["build_seconds_repeats"]) == 2
    assert len(result["build_seconds_plain_repeats"]) == 1 and result["build_seconds_plain_median"] > 0
    assert min(result["build_seconds_repeats"]) <= result["build_seconds_median"] <= max(result["build_seconds_repeats"])
    assert result["host_copies"] == "both" and result["families"]["hunyuan"]["repeats_same_tensors"]
    assert result["pinned_host_used"] is False and result["host_copies_path"] == "direct"  # no page-locking on the CPU
    pixart = result["families"]["pixart_alpha"]
    assert pixart["layer_by_layer_error_max_rel_diff"] < 1e-12
    for option, total in pixart["objective_by_option"].items():
        assert total > 0 and abs(total - pixart["layer_by_layer_objective_by_option"][option]) <= 1e-12 * total
    sweep = pixart["chunk_sweep"]["64"]  # 64-weight chunks: other batches, same codes and parameters
    assert sweep["same_tensors"] and sweep["error_max_rel_diff"] < 1e-12
    assert "layer_by_layer_seconds" not in result["families"]["hunyuan"]
    assert pixart["warm_build_seconds"] > 0 and "profile" not in result["families"]["hunyuan"]
    prof = pixart["profile"]  # on the CPU the profiler sees no device time, but the build ran under it
    assert prof["wall_seconds_under_profiler"] > 0 and len(prof["top_device_ops"]) > 0
