"""The multiquant half's subcommands of ``qua2sedimo`` (``register`` adds them; ``qua2sedimo.cli`` collects).

Each subcommand is a thin argparse front over a library function; per-model scripts in
``multiquant/scripts/`` call the same functions with the family preset.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from multiquant.paths import constants


from .cli_flags import act_bits_arg, add_activation_args, add_model_flags, add_refiner_args, refiner_arg
from .cli_flags import default_device as _device
from .errors import InputError, UserError
from .families import SCORING_DTYPES


def load_denoiser(args, family_name: str | None = None, dtype=None):
    """The family spec and its denoiser as the flags ask (tiny random, or trained weights).

    ``dtype`` defaults to the family's on a GPU and fp32 on a CPU (fp16 matmuls are slow or missing there)."""
    import torch

    from .families import get_family

    family = get_family(family_name or args.model)
    device = _device(args.device)
    if dtype is None:
        dtype = family.dtype if device != "cpu" else torch.float32
    if args.tiny:
        return family, family.build("tiny", device=device, dtype=dtype)
    return family, family.load(args.pretrained, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ inspect
def cmd_inspect(args) -> int:
    from .families import get_family
    from .layers import excluded_layers, fp_bytes, quantizable_layers

    family = get_family(args.model)
    if args.full_size:
        model = family.build("full", device="meta")
    else:
        family, model = load_denoiser(args)
    layers = quantizable_layers(model, family)
    info = {
        "model": family.name, "num_layers": len(layers), "fp_bytes": fp_bytes(layers, family.fp_prec),
        "fp_prec": family.fp_prec, "fp_bytes_dedup": fp_bytes(layers, family.fp_prec, dedup=True),
        "num_search_layers": sum(1 for r in layers if not r.tied_to),
        "num_split_halves": sum(1 for r in layers if r.cols is not None),
        "num_tied": sum(1 for r in layers if r.tied_to), "excluded": excluded_layers(model, family),
        "reference_fp_bytes": family.reference_fp_bytes,
        "num_weights": sum(r.numel for r in layers),
    }
    if args.layers:
        info["layers"] = [{"key": r.key, "shape": list(r.shape), "tied_to": r.tied_to} for r in layers]
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            print(f"{k:>20}: {v}")
    return 0


def cmd_families(args) -> int:
    from .families import get_family, list_families

    for name in list_families():
        f = get_family(name)
        print(f"{name:14} {f.hub_id or f.default_pretrained}  {f.resolution}px  {f.steps} steps  guidance {f.guidance}")
    return 0


# ----------------------------------------------------------------------------------- multiquantizer
def cmd_multiquantizer(args) -> int:
    from .checkpoint import MultiQuantizer
    from .families import get_family
    from .utils import check_writable_dir, remove_stale_temps

    # tiny random weights never take the real checkpoint's name (every loader looks for <model>_tiny_mq)
    default_name = f"{get_family(args.model).name}{'_tiny' if args.tiny else ''}_mq.safetensors"
    out = Path(args.out) if args.out else Path(constants.MULTIQUANTIZER_DIR) / default_name
    if out.suffix != ".safetensors":
        out = out / default_name
    if args.chunk_elements is not None and args.chunk_elements < 1:
        raise InputError(f"--chunk_elements must be a positive number of weights, got {args.chunk_elements}")
    check_writable_dir(out.parent, what="--out directory")  # before the (long) model load and build
    remove_stale_temps(out)  # a killed earlier build's partial file
    family, model = load_denoiser(args)
    bits = tuple(int(b) for b in args.bits.split(","))
    chunk = {} if args.chunk_elements is None else {"chunk_elements": args.chunk_elements}
    mq = MultiQuantizer.build(model, family, bits=bits, seed=args.seed, kmeans_iters=args.kmeans_iters,
                              model_id=args.pretrained, show_progress=True, **chunk)
    path = mq.save_pretrained(out, overwrite=args.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {len(mq.layers)} layers, "
          f"{mq.manifest['build_seconds']:.1f} s)")
    if args.export_table:
        print(f"wrote {mq.export_option_table(args.export_table)}")
    return 0


def cmd_scores_table(args) -> int:
    from .tables import records_frame, write_table

    cache = Path(args.cache)
    frame = records_frame(cache / "quant_cache.pkl" if cache.is_dir() else cache, layer_options=args.layers)
    print(f"wrote {write_table(frame, args.out)} ({len(frame)} configurations, {len(frame.columns)} columns)")
    return 0


def cmd_export_table(args) -> int:
    from .checkpoint import MultiQuantizer

    mq = MultiQuantizer.from_pretrained(args.checkpoint)
    print(f"wrote {mq.export_option_table(args.out)}")
    return 0


# ------------------------------------------------------------------------------------- evaluation
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    add_refiner_args(p)
    p.add_argument("--outdir", required=True, help="run directory: quant_cache.pkl, records/, run_meta.json")
    p.add_argument("--num_images", type=int, default=None, help="images per configuration (default: the family's 1000)")
    p.add_argument("--image_seed", type=int, default=42, help="base seed of the per-image noise (same for every config)")
    p.add_argument("--batch_size", type=int, default=None, help="images per denoiser batch (default: the family's)")
    p.add_argument("--mq", default=None, help="multiquantizer checkpoint (default multiquantizers/<model>_mq.safetensors)")
    _add_build_mq_arg(p)
    p.add_argument("--coco_path", default=None, help="captions_val2017.json (default: constants / QUA2SEDIMO_COCO_CAPTIONS)")
    p.add_argument("--reference_dir", default=None, help="FID reference image folder (COCO val2017 / ImageNet val)")
    p.add_argument("--inception", default=None, help="clean-fid Inception torchscript file (or QUA2SEDIMO_INCEPTION)")
    p.add_argument("--random_features", action="store_true", help="random-weight Inception: timing runs only")
    p.add_argument("--save_images", action="store_true", help="also write PNGs of every configuration")
    p.add_argument("--no_proxies", action="store_true", help="skip FID-FP / PSNR / SSIM against the FP images")
    p.add_argument("--clip_dir", default=None, help="local CLIP model directory: also record the CLIP score "
                                                    "(text families; or set QUA2SEDIMO_CLIP)")
    add_activation_args(p)  # W-x A-y scores: every record says its act_bits, the run directory too
    p.add_argument("--compile", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the denoiser in place (GPU runs: one compile per batch shape, then faster "
                        "sampling; recorded, so a run never mixes it with eager results): " + ", ".join(COMPILE_MODES))
    p.add_argument("--channels_last", action="store_true",
                   help="convolutional rendering modules (U-Net denoisers, the VAE decoder, a plain module family's "
                        "convolutions) in channels-last memory format: faster convolutions on GPUs (recorded)")
    p.add_argument("--dtype", default=None, choices=tuple(SCORING_DTYPES), metavar="DTYPE",
                   help="render in this precision instead of the family's (e.g. float16 for SD1.x, which defaults "
                        "to float32 as the reference ran it); recorded when it changes the precision, refused where "
                        "the family declares it unsafe: " + ", ".join(SCORING_DTYPES))



def _add_build_mq_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--build_mq", action="store_true",
                   help="build the multiquantizer checkpoint (at --mq or the default path) if it does not exist; "
                        "without it a missing checkpoint is an error")


def _scorer_from_args(args):
    from .evaluate import setup_scorer
    from .families import get_family
    from .utils import check_writable_dir

    family = get_family(args.model)
    check_writable_dir(args.outdir, what="--outdir")  # before the model is loaded
    return setup_scorer(family, pretrained=args.pretrained, tiny=args.tiny, device=args.device, mq_path=args.mq,
                        num_images=args.num_images, image_seed=args.image_seed, batch_size=args.batch_size,
                        coco_path=args.coco_path, reference_dir=args.reference_dir, inception=args.inception,
                        random_features=args.random_features, proxies=not args.no_proxies,
                        save_images=Path(args.outdir) / "images" if args.save_images else None,
                        clip_dir=args.clip_dir or os.environ.get("QUA2SEDIMO_CLIP"), refiner=refiner_arg(args),
                        build_mq=args.build_mq, act_bits=act_bits_arg(args), compile_mode=args.compile,
                        dtype=args.dtype, channels_last=args.channels_last)


def _open_store(outdir, meta):
    from . import distributed as dist
    from .store import RecordStore

    store = RecordStore(outdir, meta) if dist.is_main() else None
    dist.barrier()
    return store if store is not None else RecordStore(outdir, meta)


def cmd_eval_random(args) -> int:
    """Sample --num_archs random configurations and score each into OUTDIR/quant_cache.pkl (resumable)."""
    from . import distributed as dist
    from .evaluate import random_configs, score_into_store

    dist.init_from_env()
    scorer, settings = _scorer_from_args(args)
    meta = dict(settings, kind="random", seed=args.seed, a_l=args.a_l, a_u=args.a_u)  # more archs may follow
    store = _open_store(args.outdir, meta)
    extra = {"seed": args.seed, "a_l": args.a_l, "a_u": args.a_u}
    score_into_store(scorer, store, random_configs(scorer.mq.layers, args.seed, args.num_archs, args.a_l, args.a_u),
                     extra_of=lambda i: extra)
    if dist.is_main():
        print(f"wrote {store.cache_path} ({len(store)} configurations)")
    dist.cleanup()
    return 0


def named_configs(args, layers) -> list[tuple[str, dict, dict | None]]:
    """Configurations named on the command line: files, uniform options, FP16, each with its ``origin``
    (what the file records about where it came from; ``None`` when it records nothing)."""
    from .config import load_config, load_config_origin, uniform_config

    items = [(Path(p).stem, load_config(p), load_config_origin(p)) for p in args.configs or []]
    for option in filter(None, (args.uniform or "").split(",")):
        option = option.strip()
        items.append((f"uniform_{option}", uniform_config(layers, option), {"kind": "uniform", "option": option}))
    if args.fp16:
        items.append(("fp16", uniform_config(layers, "fp16"), {"kind": "fp16"}))
    if not items:
        raise InputError("no configurations given: pass --configs FILE..., --uniform mse-4,kmeans-4,... or --fp16")
    return items


def cmd_eval_configs(args) -> int:
    """Score given configurations (files, uniform baselines) with exactly the eval-random protocol."""
    from . import distributed as dist
    from .evaluate import score_into_store

    dist.init_from_env()
    scorer, settings = _scorer_from_args(args)
    items = named_configs(args, scorer.mq.layers)
    store = _open_store(args.outdir, dict(settings, kind="given", names=[n for n, _, _ in items]))

    def extra_of(i):
        name, _, origin = items[i]
        return {"name": name} if origin is None else {"name": name, "origin": origin}

    score_into_store(scorer, store, [(i, c) for i, (_, c, _) in enumerate(items)], extra_of=extra_of)
    if dist.is_main():
        from .metrics.metric import metric_label

        label = metric_label(scorer.metric)
        for rec in store.records():
            act = f"  A{rec['act_bits']}" if rec.get("act_bits", 16) != 16 else ""
            print(f"{rec.get('name', ''):>28}  avg_bits {rec['avg_bits']:.3f}{act}  {label} {float(rec['FID-GT-1k']):.3f}")
        print(f"wrote {store.cache_path}")
    dist.cleanup()
    return 0


# ------------------------------------------------------------------------------------------ infer
def _check_module_infer_args(args, family) -> None:
    """A plain-module family renders with its own sampler and conditions: flags it cannot take are errors,
    never silently dropped."""
    fixed = [f"--{name} {getattr(args, name)}" for name in ("res", "steps", "guidance") if getattr(args, name) is not None]
    if fixed:
        raise InputError(f"family {family.name!r} renders with its own sampler, which fixes its resolution, steps and "
                         f"guidance: {', '.join(fixed)} does not apply (change the family's sampler)")
    if args.cls_id is not None and not family.num_classes:
        raise InputError(f"family {family.name!r} has no classes (FamilySpec.num_classes): leave out --cls_id")
    if args.cls_id is not None and not 0 <= args.cls_id < family.num_classes:
        raise InputError(f"--cls_id {args.cls_id}: family {family.name!r} has classes 0..{family.num_classes - 1}")


def cmd_infer(args) -> int:
    """Generate images with a configuration (FP16 when --q_config is omitted)."""
    from .adapters import SamplerOptions
    from .config import load_config, quantize_, validate_config
    from .adapters import adapter_for
    from .evaluate import Loaded, load_for_scoring, load_or_build_multiquantizer, save_pngs
    from .families import get_family
    from .reporting import save_image_grid

    if args.export:  # a packed export: its family, its weights
        from .export import load_quantized, read_export_info

        info = read_export_info(args.export)
        if args.model and args.model != info["family"]:
            raise InputError(f"--export {args.export} holds family {info['family']!r}, not --model {args.model!r}")
        if args.q_config:
            raise InputError("--export already holds its configuration: leave out --q_config")
        family = get_family(info["family"])
        device = _device(args.device)
        packed = load_quantized(args.export, device=device)
        adapter = adapter_for(family)
        loaded = Loaded(family, adapter, adapter.pipeline_with(family, packed, args.pretrained, device, args.tiny),
                        packed, device)
    else:
        if not args.model:
            raise InputError("give --model (or --export DIR)")
        family = get_family(args.model)
        loaded = load_for_scoring(family, args.pretrained, args.tiny, _device(args.device))
    denoiser = loaded.denoiser
    # FP runs are named by the precision they really ran in (a CPU run computes in float32)
    weight_dtype = next((p.dtype for p in denoiser.parameters() if p.is_floating_point()), None)
    fp_tag = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}.get(str(weight_dtype), "fp16")
    tag = f"export_{Path(args.export).name}" if args.export else fp_tag
    if args.q_config:
        mq = load_or_build_multiquantizer(family, denoiser, args.mq, tiny=args.tiny, build=args.build_mq)
        config = validate_config(load_config(args.q_config), mq.layers, options=mq.options, fill=args.fill)
        quantize_(denoiser, config, mq)
        tag = Path(args.q_config).stem
    if args.quant_act:
        from .activations import enable_activation_quant

        enable_activation_quant(denoiser, bits=args.act_bit)
        tag += f"_a{args.act_bit}"
    if family.is_module:
        _check_module_infer_args(args, family)
    if family.is_module and args.cls_id is None and (family.conditions is not None or not family.num_classes):
        conditions = loaded.adapter.conditions(family, args.n_imgs)  # its own conditions(n), or unconditional
    elif family.conditioning == "text" and not family.is_module:
        conditions = [args.prompt] * args.n_imgs
    elif args.cls_id is not None or family.num_classes:
        conditions = [args.cls_id if args.cls_id is not None else 0] * args.n_imgs
    else:
        conditions = loaded.adapter.conditions(family, args.n_imgs)
    options = SamplerOptions(seed=args.seed, steps=args.steps, guidance=args.guidance, resolution=args.res,
                             embed_seed=args.seed,
                             refiner=loaded.adapter.refiner(family, refiner_arg(args), loaded.device, args.tiny))
    sampler = loaded.adapter.sampler(family, loaded.pipe, conditions, options, tiny=args.tiny)
    images = sampler.generate(list(range(args.n_imgs)))
    out = Path(args.outdir) / tag
    save_pngs(images, list(range(args.n_imgs)), out)
    grid = save_image_grid(images, out / "grid.png")
    print(f"wrote {args.n_imgs} images and {grid}")
    return 0


# ------------------------------------------------------------------------------------------ export
def cmd_export(args) -> int:
    """Write a configuration as a packed model directory (real sub-4-bit weights on disk)."""
    from .config import load_config, uniform_config, validate_config
    from .evaluate import load_or_build_multiquantizer
    from .export import WEIGHTS_NAME, export_quantized, read_export_info, safetensors_bytes
    from .families import get_family

    if not (args.q_config or args.uniform):
        raise InputError("no configuration given: pass --q_config FILE (.pkl/.json) or --uniform mse-4")
    # the family's precision even on a CPU: export only packs, it runs no forward
    family, denoiser = load_denoiser(args, dtype=get_family(args.model).dtype)
    mq = load_or_build_multiquantizer(family, denoiser, args.mq, tiny=args.tiny, build=args.build_mq)
    config = load_config(args.q_config) if args.q_config else uniform_config(mq.layers, args.uniform)
    config = validate_config(config, mq.layers, options=mq.options, fill=args.fill)
    out = export_quantized(denoiser, family, config, mq, args.out)
    info, size = read_export_info(out), safetensors_bytes(out / WEIGHTS_NAME)
    print(f"wrote {out}: {size['file'] / 2**20:.1f} MiB, avg_bits {info['avg_bits']:.3f}, "
          f"{info['num_packed_modules']} packed modules, {info['num_fp16_layers']} fp16 layers")
    return 0


def cmd_load_check(args) -> int:
    """Load a packed export, run one denoiser forward; with --compare, against the simulated configuration."""
    import torch

    from .config import quantize_
    from .evaluate import load_or_build_multiquantizer
    from .export import check_export, read_export_info

    info = read_export_info(args.dir)
    if args.model and args.model != info["family"]:
        raise UserError(f"{args.dir} was exported from family {info['family']!r}, not {args.model!r}: pass that "
                        f"family, or no --model/--family")
    device = _device(args.device)
    dtype = getattr(torch, args.dtype or info["dtype"])  # default: the dtype it was exported in (exact)
    simulated = None
    if args.compare:  # the FP denoiser the export came from, with the configuration simulated in place
        family, simulated = load_denoiser(args, info["family"], dtype=getattr(torch, info["dtype"]))
        mq = load_or_build_multiquantizer(family, simulated, args.mq, tiny=args.tiny, build=args.build_mq)
        quantize_(simulated, info["config"], mq)
    report = check_export(args.dir, device=device, dtype=dtype, simulated=simulated, batch=args.batch,
                          tolerance=args.tolerance)
    print(json.dumps(report, indent=1))
    print(f"{'PASS' if report['passed'] else 'FAIL'}: {report['reason']}")
    return 0 if report["passed"] else 1


# ------------------------------------------------------------------------------------------- parser
def register(sub) -> None:
    """Add this half's subcommands to the ``qua2sedimo`` sub-parsers (each with ``func`` set)."""
    p = sub.add_parser("families", help="list the registered model families")
    p.set_defaults(func=cmd_families)

    p = sub.add_parser("inspect", help="quantizable layers and FP size of a denoiser")
    add_model_flags(p)
    p.add_argument("--full-size", action="store_true", help="full-size architecture on the meta device (no weights)")
    p.add_argument("--json", action="store_true", help="print JSON instead of aligned text")
    p.add_argument("--layers", action="store_true", help="also list every layer")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("multiquantizer", help="build the multiquantizer checkpoint (all options of all layers)")
    add_model_flags(p)
    p.add_argument("--bits", default="4,3", help="comma list of bit widths to build every method at (default 4,3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the K-Means initialisation (default 0)")
    p.add_argument("--kmeans_iters", type=int, default=100, help="K-Means iterations per layer (default 100)")
    p.add_argument("--chunk_elements", type=int, default=None,
                   help="weights quantized per batched call (bounds the device temporaries, roughly 100 bytes per weight; "
                        "default 2^27; the result does not depend on it)")
    p.add_argument("--out", default=None, help="file or directory (default multiquantizers/<model>_mq.safetensors; "
                                               "--tiny: <model>_tiny_mq.safetensors)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint even if it was built from other weights")
    p.add_argument("--export_table", default=None, help="also write the option table (<model>_mq.pkl or .json)")
    p.set_defaults(func=cmd_multiquantizer)

    p = sub.add_parser("scores-table", help="a quant_cache.pkl as one table (CSV / Parquet): a row per configuration")
    p.add_argument("--cache", required=True, help="quant_cache.pkl (or an eval run directory holding one)")
    p.add_argument("--out", required=True, help="output file: .csv or .parquet")
    p.add_argument("--layers", action="store_true", help="also one column per layer with its option")
    p.set_defaults(func=cmd_scores_table)

    p = sub.add_parser("export-table", help="write a checkpoint's per-layer option table (_mq.pkl / .json)")
    p.add_argument("--checkpoint", required=True, help="multiquantizer checkpoint (.safetensors)")
    p.add_argument("--out", required=True, help="output file: .pkl (the reference's _mq.pkl) or .json")
    p.set_defaults(func=cmd_export_table)

    p = sub.add_parser("eval-random", help="score random configurations into quant_cache.pkl (resumable, torchrun-able)")
    _add_eval_args(p)
    p.add_argument("--num_archs", type=int, default=500, help="random configurations to score (default 500)")
    p.add_argument("--seed", type=int, default=42, help="configuration seed: config i is a function of (seed, i)")
    p.add_argument("--a_l", type=float, default=0.0, help="lower bound of the per-config 3-bit probability")
    p.add_argument("--a_u", type=float, default=1.0, help="upper bound of the per-config 3-bit probability")
    p.set_defaults(func=cmd_eval_random)

    p = sub.add_parser("eval-configs", help="score given configurations with the same protocol")
    _add_eval_args(p)
    p.add_argument("--configs", nargs="*", help="quant_configs/*.pkl or .json files")
    p.add_argument("--uniform", default=None, help="comma list of uniform options, e.g. mse-4,kmeans-4,kmeans_all-4")
    p.add_argument("--fp16", action="store_true", help="also score the unquantized model")
    p.set_defaults(func=cmd_eval_configs)

    p = sub.add_parser("infer", help="generate images with a quantization configuration or a packed export")
    add_model_flags(p, required=False, model_help="model family (default with --export: the export's)")
    p.add_argument("--q_config", default=None, help="quant_configs/<model>_<bits>.pkl or .json (default: FP16)")
    p.add_argument("--export", default=None, help="a packed export directory (qua2sedimo export): generate with it")
    add_refiner_args(p)
    p.add_argument("--fill", default=None, help="option for layers missing from the file (default: error)")
    p.add_argument("--mq", default=None, help="multiquantizer checkpoint")
    _add_build_mq_arg(p)
    p.add_argument("--prompt", default="a lion riding a bike in Paris", help="text prompt (text families)")
    p.add_argument("--cls_id", type=int, default=None, help="class label (DiT: ImageNet id; mnist_dit: digit)")
    p.add_argument("--n_imgs", type=int, default=4, help="number of images (default 4)")
    p.add_argument("--outdir", default="samples", help="output folder; images go to OUTDIR/<config name> (default samples)")
    p.add_argument("--seed", type=int, default=42, help="base seed of the per-image noise (default 42)")
    p.add_argument("--res", type=int, default=None, help="resolution (default: the family's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the family's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the family's)")
    add_activation_args(p)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("export", help="write a configuration as a packed model (real sub-4-bit weights)")
    add_model_flags(p)
    p.add_argument("--q_config", default=None, help="configuration file (.pkl/.json)")
    p.add_argument("--uniform", default=None, help="or one option for every layer, e.g. mse-4")
    p.add_argument("--fill", default=None, help="option for layers missing from the file (default: error)")
    p.add_argument("--mq", default=None, help="multiquantizer checkpoint")
    _add_build_mq_arg(p)
    p.add_argument("--out", required=True, help="output directory (config.json, quantized.safetensors, quantization.json)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("load-check", help="load a packed export and run one forward (optionally vs the simulation)")
    p.add_argument("dir", help="export directory")
    add_model_flags(p, required=False, model_help="the export's family (default: the one it records; give --family "
                                                  "for your own)", tiny_help="with --compare: the tiny random denoiser")
    p.add_argument("--dtype", default=None, help="compute dtype, e.g. float32 (default: the exported one)")
    p.add_argument("--batch", type=int, default=2, help="batch size of the test forward")
    p.add_argument("--compare", action="store_true", help="also build the simulated configuration and compare")
    p.add_argument("--mq", default=None, help="with --compare: multiquantizer checkpoint")
    _add_build_mq_arg(p)
    p.add_argument("--tolerance", type=float, default=0.0, help="max abs difference allowed with --compare")
    p.set_defaults(func=cmd_load_check)

    from .sensitivity import add_parsers as add_sensitivity_parsers

    add_sensitivity_parsers(sub)  # sensitivity, flops, optimize-mixed-precision
