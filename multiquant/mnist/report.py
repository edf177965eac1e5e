"""Measure the shipped MNIST DiT's quality and write it into its model card.

    python -m multiquant.mnist.report [--device cpu] [--uniform mse-4,kmeans-4,kmeans_all-4,mse-3,kmeans-3,kmeans_all-3] [--write-card]

MNIST-FID and digit accuracy of the FP16 weights on the family protocol (1,000 images, image ``i`` gets
digit ``i % 10`` and seed ``i``), the FID floor of 1,000 real held-out digits, and optionally uniform
quantization configurations (every layer at one option, through the multiquantizer). Results go to
``quality.json`` beside the weights; ``--write-card`` re-renders ``README.md``.
"""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from ..families import get_family
from . import cards
from .classifier import CLASSIFIER_DIR, load_classifier, load_reference_stats
from .quality import evaluate_pipeline, evaluation_plan, score_digits

DEFAULT_UNIFORM = ("mse-4", "kmeans-4", "kmeans_all-4", "mse-3", "kmeans-3", "kmeans_all-3")


def real_floor(classifier, ref_stats: dict, mnist_dir=None) -> dict:
    """MNIST-FID and accuracy of the 1,000 real ``eval`` digits (recorded value when the data is absent)."""
    try:
        from .data import load_split

        images, labels = load_split("eval", mnist_dir)
    except FileNotFoundError:
        info = cards.read_json(CLASSIFIER_DIR / "training.json") or {}
        return {"fid": info.get("fid_floor_eval_1000"), "accuracy": info.get("accuracy", {}).get("eval"),
                "source": "mnist_classifier/training.json"}
    floor = dict(score_digits(images, labels, classifier, ref_stats), source="MNIST eval split")
    # Same N drawn from the reference digits themselves: the finite-sample part of the floor.
    ref_images, _ = load_split("reference", mnist_dir)
    floor["fid_reference_subset"] = score_digits(ref_images[:len(images)], None, classifier, ref_stats)["fid"]
    return floor


def multiquantizer_for(model, mq_path=None):
    """Load ``mq_path`` (checked against the weights) or build the multiquantizer (saved there if given)."""
    from ..checkpoint import MultiQuantizer

    spec = get_family("mnist_dit")
    if mq_path and Path(mq_path).exists():
        mq = MultiQuantizer.from_pretrained(mq_path)
        mq.check_compatible(model, spec)
        return mq
    mq = MultiQuantizer.build(model, spec, show_progress=False)
    if mq_path:
        mq.save_pretrained(mq_path)
    return mq


def uniform_results(pipe, mq, options, kwargs: dict, log=print) -> dict:
    """Score each uniform configuration; the denoiser's FP weights are restored afterwards."""
    from ..config import config_record, quantize_, uniform_config
    from ..options import FP_OPTION, Option

    model = pipe.transformer
    results = {}
    for option in options:
        config = uniform_config(mq.layers, option)
        quantize_(model, config, mq)
        record = config_record(config, mq.table, mq.fp_prec, mq.fp_bytes)
        r = evaluate_pipeline(pipe, **kwargs)
        results[option] = dict(r, avg_bits=record["avg_bits"], method_name=Option.parse(option).spec.label,
                               quantized_error=record["quantized_error"])
        log(f"uniform {option}: FID {r['fid']:.3f}  accuracy {r['accuracy']:.3f}  ({record['avg_bits']:.2f} bits)")
    quantize_(model, uniform_config(mq.layers, FP_OPTION), mq)
    return results


def sample_grid(pipe, mq, options, path, steps: int, guidance: float, per_row: int = 10) -> Path:
    """PNG with one row of digits 0..9 (plan images 0..9) per configuration: FP first, then ``options``."""
    from ..config import quantize_, uniform_config
    from ..reporting import save_image_grid
    from ..options import FP_OPTION

    labels, seeds = evaluation_plan(per_row)
    rows = []
    for option in (FP_OPTION, *options):
        if mq is not None:
            quantize_(pipe.transformer, uniform_config(mq.layers, option), mq)
        rows.append(pipe(labels, seeds, num_inference_steps=steps, guidance_scale=guidance)[:, :1])
    if mq is not None:
        quantize_(pipe.transformer, uniform_config(mq.layers, FP_OPTION), mq)
    return save_image_grid(torch.cat(rows), path, nrow=per_row, scale=2, pad=0)


def main(argv=None) -> dict:
    from .pipeline import MNISTDiTPipeline

    spec = get_family("mnist_dit")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default=str(spec.default_pretrained))
    p.add_argument("--mnist-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-images", type=int, default=spec.num_images)
    p.add_argument("--steps", type=int, default=spec.steps)
    p.add_argument("--guidance", type=float, default=spec.guidance)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--uniform", default="", help=f"comma-separated options, or 'all' for {','.join(DEFAULT_UNIFORM)}")
    p.add_argument("--multiquantizer", default=None, help="multiquantizer file to reuse (built and saved if missing)")
    p.add_argument("--write-card", action="store_true")
    p.add_argument("--grid", action="store_true", help="also write samples.png (digits 0-9, FP then each --uniform option)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = MNISTDiTPipeline.from_family(args.pretrained, device=args.device)
    clf = load_classifier(device=args.device)
    ref = load_reference_stats()
    kwargs = dict(num_images=args.num_images, steps=args.steps, guidance=args.guidance, seed=args.seed,
                  batch_size=args.batch_size, classifier=clf, ref_stats=ref)
    fp = evaluate_pipeline(pipe, **kwargs)
    print(f"FP16 weights: FID {fp['fid']:.3f}  accuracy {fp['accuracy']:.3f}  {fp['images_per_s']} images/s")
    floor = real_floor(clf, ref, args.mnist_dir)
    print(f"real held-out digits: FID {floor['fid']:.3f}  accuracy {floor['accuracy']:.3f}")
    quality = {
        "protocol": {"num_images": args.num_images, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
                     "seed_rule": "image i: class i % 10, torch.Generator('cpu').manual_seed(seed + i)",
                     "batch_size": args.batch_size, "dtype": str(pipe.transformer.dtype).replace("torch.", ""),
                     "reference": f"{ref['n']} held-out digits ({ref['split']} split)"},
        "device": str(args.device) if args.device != "cpu" else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "fp": fp, "fid_floor": floor["fid"], "floor_accuracy": floor["accuracy"],
        "fid_reference_subset": floor.get("fid_reference_subset"),
    }
    options = DEFAULT_UNIFORM if args.uniform == "all" else [o for o in args.uniform.split(",") if o]
    mq = multiquantizer_for(pipe.transformer, args.multiquantizer) if options else None
    if options:
        quality["uniform"] = uniform_results(pipe, mq, options, kwargs)
    outdir = Path(args.pretrained)
    if args.grid:
        quality["grid_rows"] = ["fp16", *options]
        sample_grid(pipe, mq, options, outdir / "samples.png", args.steps, args.guidance)
    cards.write_json(outdir / "quality.json", quality)
    if args.write_card:
        cards.write_text(outdir / "README.md", cards.dit_card(cards.read_json(outdir / "training.json"), quality))
    return quality


if __name__ == "__main__":
    main()
