"""W-x A-y: configurations scored with FP, A8 and A6 activations through the one scorer (any family).

    python benchmarks/activation_quant.py --model mnist_dit --num_images 256 --device cpu
    python benchmarks/activation_quant.py --model mnist_dit --tiny --num_images 8        # smoke check

One scorer (the dataset protocol: images, seeds, feature network, reference) renders the FP reference once;
each configuration (FP16, the uniform options given, and the configuration files given) is scored with
``act_bits`` None (FP activations), 8 and 6: the inputs of every Linear/Conv are fake-quantized token-wise
online (``multiquant/activations.py``), the attention matmuls stay FP. Writes
``benchmarks/results/activation_quant_<model>.json``: per configuration ``avg_bits`` and per activation width
``fid`` (the label), ``fid_fp`` (against the FP images) and ``psnr_fp``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, write_result  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="family, e.g. mnist_dit or mnist_unet")
    p.add_argument("--uniform", default="kmeans-4,kmeans_all-4", help="uniform options to score (comma list)")
    p.add_argument("--configs", nargs="*", default=None,
                   help="configuration files (default: quant_configs/<model>_35_search.pkl when it exists)")
    p.add_argument("--act_bits", default="8,6", help="activation widths besides FP (comma list)")
    p.add_argument("--num_images", type=int, default=None, help="images per configuration (default: the family's)")
    p.add_argument("--image_seed", type=int, default=42)
    p.add_argument("--tiny", action="store_true", help="tiny random model (smoke check; its own checkpoint)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import tempfile

    from multiquant.config import load_config, uniform_config
    from multiquant.evaluate import setup_scorer
    from multiquant.families import get_family
    from multiquant.utils import default_device

    args = parse_args(argv)
    family = get_family(args.model)
    device = args.device or str(default_device())
    scratch = Path(tempfile.mkdtemp()) if args.tiny else None
    started = time.perf_counter()
    scorer, settings = setup_scorer(family, tiny=args.tiny, device=device, num_images=args.num_images,
                                    image_seed=args.image_seed, build_mq=args.tiny,
                                    mq_path=scratch / "mq.safetensors" if scratch else None)
    layers = scorer.mq.layers
    items = [("fp16", uniform_config(layers, "fp16"))]
    items += [(f"uniform_{o.strip()}", uniform_config(layers, o.strip())) for o in args.uniform.split(",") if o.strip()]
    default_config = Path("quant_configs") / f"{family.name}_35_search.pkl"
    files = args.configs if args.configs is not None else ([default_config] if default_config.exists() and not args.tiny else [])
    items += [(Path(f).stem, load_config(f)) for f in files]
    widths = [None] + [int(b) for b in args.act_bits.split(",") if b.strip()]
    rows = {}
    for name, config in items:
        row = {}
        for bits in widths:
            scorer.act_bits = bits
            t0 = time.perf_counter()
            rec = scorer.record(config, name=name)
            row[f"A{bits or 16}"] = {"fid": float(rec["FID-GT-1k"]), "fid_fp": rec.get("FID-FP-1k"),
                                    "psnr_fp": rec.get("psnr_fp"), "act_bits": rec["act_bits"],
                                    "seconds": time.perf_counter() - t0}
            print(f"{name:>24} A{bits or 16:<2}  avg_bits {rec['avg_bits']:.3f}  FID {float(rec['FID-GT-1k']):.2f}  "
                  f"FID-FP {rec.get('FID-FP-1k', float('nan')):.2f}", flush=True)
        rows[name] = {"avg_bits": float(rec["avg_bits"]), **row}
    scorer.act_bits = None
    settings = {k: v for k, v in settings.items() if k != "act_bits"}
    result = {"model": family.name, "tiny": args.tiny, "environment": environment(),
              "protocol": dict(settings, act_quant="online token-wise min-max of every Linear/Conv input; "
                                                   "attention matmuls FP; FP reference images fully FP"),
              "act_bits": [w or 16 for w in widths], "configurations": rows,
              "seconds": time.perf_counter() - started}
    if args.tiny:
        return result
    write_result(f"activation_quant_{family.name}", result, args.out)
    return result


if __name__ == "__main__":
    main()
