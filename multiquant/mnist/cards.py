"""Model cards (``README.md``) of the shipped MNIST assets, rendered from their JSON records."""
from __future__ import annotations

import json
from pathlib import Path

from ..utils import write_text_atomic


def write_text(path: str | Path, text: str) -> Path:
    return write_text_atomic(path, text)


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


SPLIT_TEXT = """The official MNIST **test** set (10,000 digits, `t10k-*-idx*-ubyte.gz`) split by index `i % 10`
(`multiquant/mnist/data.py`):

| split | `i % 10` | digits | used for |
|---|---|---|---|
| train | 0-6 | 7,000 | training the denoiser and the classifier |
| reference | 7, 8 | 2,000 | MNIST-FID reference statistics (`mnist_classifier/ref_stats.npz`) |
| eval | 9 | 1,000 | FID floor (1,000 real digits vs the reference statistics) |

reference + eval (3,000 digits) are held out of both networks' training data."""


def classifier_card(info: dict) -> str:
    acc = info["accuracy"]
    return f"""# MNIST classifier (MNIST-FID feature network)

LeNet-style CNN (`multiquant/mnist/classifier.py`): conv5x5(32) - pool - conv5x5(64) - pool -
fc({info['feature_dim']}) - ReLU - dropout - fc(10). **MNIST-FID** uses the {info['feature_dim']}-d output
of the hidden fc layer before its ReLU (`MNISTClassifier.features`); FID itself is
`multiquant.metrics.fid.frechet_distance` (clean-fid formula, float64).

## Data
{SPLIT_TEXT}

## Training
`python -m multiquant.mnist.train_classifier --epochs {info['epochs']} --batch-size {info['batch_size']} --lr {info['lr']} --seed {info['seed']} --device {info['device'].split(' ')[0]}`

- {info['train_digits']:,} train digits, {info['augmentation']}; AdamW, one-cycle LR.
- Device: {info['device']} ({info['cpu']}, {info['threads']} threads), torch {info['torch']}; wall time {info['wall_time_s']} s.

## Quality
| figure | value |
|---|---|
| accuracy, 3,000 held-out digits (reference + eval) | {acc['heldout']:.2%} |
| accuracy, 2,000 reference digits | {acc['reference']:.2%} |
| accuracy, 1,000 eval digits | {acc['eval']:.2%} |
| accuracy, 7,000 train digits | {acc['train']:.2%} |
| **FID floor**: 1,000 real eval digits vs reference stats | {info['fid_floor_eval_1000']:.3f} |
| 1,000 real train digits vs reference stats | {info['fid_train_1000']:.3f} |

The classifier has seen the train digits, so their features are atypical (confident, large): that is why
the FID floor is measured on held-out digits only.

## Files
`config.json`, `model.safetensors` (fp32), `ref_stats.npz` (`mu`, `sigma` float64, `n`, `indices` into the
test set, `split`), `training.json` (this card's numbers).
Load with `multiquant.mnist.classifier.load_classifier()` / `load_reference_stats()`.
Data licence: MNIST, CC BY-SA 3.0 (Y. LeCun, C. Cortes, C. Burges).
"""


def _fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def dit_card(training: dict, quality: dict | None) -> str:
    cfg = training["config"]
    lines = [f"""# mnist_dit: class-conditional pixel-space DiT on MNIST

The embedded default family of qua2sedimo (`multiquant/families/mnist_dit.py`): a diffusers
`DiTTransformer2DModel` on raw 28x28 digits (in/out channels 1, {cfg['patch_size']}x{cfg['patch_size']} patches ->
{(cfg['sample_size'] // cfg['patch_size']) ** 2} tokens, {cfg['num_layers']} blocks, width
{cfg['num_attention_heads'] * cfg['attention_head_dim']}, {cfg['num_attention_heads']} heads), {training['parameters']:,}
parameters, weights stored in fp16. Class-conditional on the 10 digits; label index 10 is the null class of
classifier-free guidance. The {cfg['num_layers']} per-block timestep/label embedders are identical copies (trained as one
shared module, like the original DiT), which the family's tie rule (`DIT_TIES`) exploits.

Sample with `multiquant.mnist.pipeline.MNISTDiTPipeline.from_family()` (DPM-Solver++ 2M, `scheduler_config.json`).

## Data
{SPLIT_TEXT}

## Training
`python -m multiquant.mnist.train_dit --steps {training['steps']} --batch-size {training['batch_size']} --lr {training['lr']} --seed {training['seed']}`

- DDPM objective, {training['noise_schedule']['num_train_timesteps']} steps, `{training['noise_schedule']['beta_schedule']}` betas,
  {training['noise_schedule']['prediction_type']}; labels dropped to the null class with p={training['p_uncond']};
  AdamW, lr {training['lr']} ({training['warmup']} warm-up steps), grad-norm clip 1; EMA {training['ema']} (saved).
- {training['steps']:,} steps x batch {training['batch_size']} on {training['device']} (torch {training['torch']}),
  wall time {training['wall_time_s']} s{' (stopped by --time-budget-s ' + str(training['time_budget_s']) + ')' if training.get('time_budget_s') else ''};
  final loss {training['loss_history'][-1][1] if training['loss_history'] else 'n/a'}. Seeded; GPU kernels are not bitwise deterministic.
"""]
    if training.get("quick_quality"):
        lines.append("""
Protocol choice (right after training: saved fp16 weights on the training GPU, same 1,000-image plan):

| steps | guidance | MNIST-FID | classified as requested |
|---|---|---|---|
""")
        for q in training["quick_quality"]:
            lines[-1] += f"| {q['steps']} | {q['guidance']} | {q['fid']:.2f} | {q['accuracy']:.1%} |\n"
        lines[-1] += ("\nGuidance trades diversity for class fidelity and MNIST-FID penalises it, so the protocol "
                      "samples without it (guidance 1.0: one denoiser pass per step).\n")
    if quality:
        p = quality["protocol"]
        fp = quality["fp"]
        lines.append(f"""
## Quality (measured with `python -m multiquant.mnist.report --uniform all --grid --write-card`)
Protocol: {p['num_images']:,} images, class `i % 10` and seed `i` for image `i` ({p['num_images'] // 10} per digit),
{p['steps']} DPM-Solver++ steps, guidance {p['guidance']}, {quality['device']} ({p['dtype']}).
MNIST-FID = Frechet distance of the shipped classifier's features to the 2,000 held-out reference digits.

| model | MNIST-FID (1,000) | classified as requested digit |
|---|---|---|
| real held-out digits (FID floor, 1,000 eval digits) | {_fmt(quality['fid_floor'])} | {_fmt(quality.get('floor_accuracy'), '.1%')} |
| FP16 weights | {_fmt(fp['fid'])} | {_fmt(fp['accuracy'], '.1%')} |
""")
        floor_note = f"""
At N = 1,000 the FID of real digits is mostly finite-sample bias: 1,000 of the 2,000 reference digits
themselves score {_fmt(quality.get('fid_reference_subset'))}. Real handwriting has heavier-tailed features (rare, odd digits) than the model's samples, so the model can score below the real-digit floor;
compare configurations with each other, on the same protocol.
"""
        for option, r in quality.get("uniform", {}).items():
            lines[-1] += f"| uniform {option} ({r['method_name']}, {r['avg_bits']:.2f} avg bits) | {_fmt(r['fid'])} | {_fmt(r['accuracy'], '.1%')} |\n"
        lines.append(floor_note)
        lines.append(f"\nSampling speed: {fp['images_per_s']} images/s ({quality['device']}, batch {p['batch_size']}, "
                     f"{quality.get('threads', '?')} threads; guidance > 1 doubles the denoiser batch).\n")
        if quality.get("notes"):
            lines.append(f"\n{quality['notes']}\n")
        if quality.get("grid_rows"):
            lines.append(f"\n![samples](samples.png)\n\n`samples.png`: digits 0-9 (plan images 0-9), one row per "
                         f"configuration, top to bottom: {', '.join(quality['grid_rows'])}.\n")
    lines.append("""
## Files
`config.json` + `diffusion_pytorch_model.safetensors` (fp16, `DiTTransformer2DModel.from_pretrained`),
`scheduler_config.json` (sampler), `training.json` (training record and loss curve), `quality.json`.
Data licence: MNIST, CC BY-SA 3.0 (Y. LeCun, C. Cortes, C. Burges).
""")
    return "".join(lines)


def scored_summary(cache_dir: str | Path) -> dict | None:
    """Uniform baselines (``baselines.pkl``) and the random dataset's range (``quant_cache.pkl``) of a shipped
    pre-scored dataset folder, with the commands' settings (None when the folder holds neither)."""
    from ..store import load_quant_cache

    cache_dir = Path(cache_dir)
    out = {}
    if (cache_dir / "baselines.pkl").is_file():
        out["baselines"] = {r["name"]: {k: float(r[k]) for k in ("FID-GT-1k", "avg_bits", "FID-FP-1k", "psnr_fp", "ssim_fp")
                                        if k in r} for r in load_quant_cache(cache_dir / "baselines.pkl")}
        out["baselines_run_meta"] = read_json(cache_dir / "baselines_run_meta.json")
    if (cache_dir / "quant_cache.pkl").is_file():
        records = load_quant_cache(cache_dir / "quant_cache.pkl")
        fid = sorted(float(r["FID-GT-1k"]) for r in records)
        bits = [float(r["avg_bits"]) for r in records]
        out["dataset"] = {"configurations": len(records), "fid_min": fid[0], "fid_median": fid[len(fid) // 2],
                          "fid_max": fid[-1], "avg_bits_min": min(bits), "avg_bits_max": max(bits)}
        out["dataset_run_meta"] = read_json(cache_dir / "run_meta.json")
    return out or None


def unet_card(training: dict, quality: dict | None, scored: dict | None = None) -> str:
    cfg = training["config"]
    ch = cfg["channels"]
    lines = [f"""# mnist_unet: class-conditional convolutional U-Net DDPM on MNIST

The second embedded testbed of qua2sedimo, brought in the way a user brings their own denoiser: a plain
PyTorch `nn.Module` (`multiquant/mnist/unet.py`, no diffusers class) with its own ancestral DDPM sampler,
registered through the public family protocol (`multiquant/families/mnist_unet.py`).

## Architecture
`MNISTUNet(channels={ch}, emb_dim={cfg['emb_dim']})`, {training['parameters']:,} parameters, weights stored in fp16
(`model.safetensors`, the config is in its metadata):
- time: sinusoidal({ch[0]}) -> Linear -> SiLU -> Linear ({cfg['emb_dim']}); label: `nn.Embedding(10, {cfg['emb_dim']})`;
- ResBlock: GroupNorm({cfg['groups']})-SiLU-conv3x3, + `time_proj`(t) + `label_proj`(y) (Linear each),
  GroupNorm-SiLU-dropout({cfg['dropout']})-conv3x3, residual (1x1 conv when the width changes);
- `conv_in` 3x3 (1 -> {ch[0]}); down path: one ResBlock per level at {', '.join(f'{28 // 2 ** i}x{28 // 2 ** i} ({c})' for i, c in enumerate(ch))},
  stride-2 conv between levels; `mid_block`; up path: one ResBlock per level fed with the channel-concatenated
  skip, nearest-upsample + conv3x3 between levels; GroupNorm-SiLU-`conv_out` 3x3 -> epsilon.

## Data
{SPLIT_TEXT}

## Training
`python -m multiquant.mnist.train_unet --steps {training['steps']} --batch-size {training['batch_size']} --lr {training['lr']} --seed {training['seed']}`

- DDPM objective, {training['noise_schedule']['num_train_timesteps']} steps, linear betas
  {training['noise_schedule']['beta_start']}-{training['noise_schedule']['beta_end']}, epsilon prediction (MSE);
  AdamW, lr {training['lr']} ({training['warmup']} warm-up steps), grad-norm clip 1; EMA {training['ema']} (saved);
  {training.get('precision', 'fp32')}.
- {training['steps']:,} steps x batch {training['batch_size']} on {training['device']} (torch {training['torch']}),
  wall time {training['wall_time_s']} s{' (stopped by --time-budget-s ' + str(training['time_budget_s']) + ')' if training.get('time_budget_s') else ''};
  final loss {training['loss_history'][-1][1] if training['loss_history'] else 'n/a'}. Seeded; GPU kernels are not bitwise deterministic.
"""]
    if training.get("quick_quality"):
        lines.append("""
Sampler choice (right after training: saved fp16 weights on the training GPU, 1,000-image plan):

| steps | variance | MNIST-FID | classified as requested | images/s |
|---|---|---|---|---|
""")
        for q in training["quick_quality"]:
            lines[-1] += f"| {q['steps']} | {q['variance']} | {q['fid']:.2f} | {q['accuracy']:.1%} | {q['images_per_s']} |\n"
        lines[-1] += ("\nThe first row's speed includes cuDNN autotuning and drawing the noise. The family samples with "
                      "50 steps and the small (posterior) variance: the large one leaves visible speckle at 50 steps.\n")
    if quality:
        p, fp = quality["protocol"], quality["fp"]
        lines.append(f"""
## Quality
Protocol: {p['num_images']:,} images, class `i % 10` and seed `i` for image `i`; {p['sampler']}, {p['steps']} steps
({p['timesteps']}, {p['variance']} variance, x0 clipped), {quality['device']} ({p['dtype']}). Each image draws all its
noise from `torch.Generator('cpu').manual_seed(seed)`, so images do not depend on batching and configurations
share noise. MNIST-FID = Frechet distance of the shipped LeNet classifier's features
(`multiquant/assets/mnist_classifier`) to the 2,000 held-out reference digits.

| model | MNIST-FID (1,000) | classified as requested digit |
|---|---|---|
| real held-out digits (FID floor, 1,000 eval digits) | {_fmt(quality['fid_floor'])} | {_fmt(quality.get('floor_accuracy'), '.1%')} |
| FP16 weights | {_fmt(fp['fid'])} | {_fmt(fp['accuracy'], '.1%')} |
""")
        for option, r in quality.get("uniform", {}).items():
            lines[-1] += (f"| uniform {option} ({r['method_name']}, {r['avg_bits']:.2f} avg bits) | {_fmt(r['fid'])} | "
                          f"{_fmt(r['accuracy'], '.1%')} |\n")
        lines.append(f"""
At N = 1,000 the FID of real digits is mostly finite-sample bias (1,000 of the reference digits themselves score
{_fmt(quality.get('fid_reference_subset'))}); compare configurations with each other, on the same protocol.
Sampling speed: {fp['images_per_s']} images/s on {quality['device']}.
""")
        if quality.get("grid_rows"):
            lines.append(f"\n![samples](samples.png)\n\n`samples.png`: digits 0-9 per row, top to bottom: "
                         f"{', '.join(quality['grid_rows'])}.\n")
    if scored and scored.get("baselines"):
        meta = scored.get("baselines_run_meta") or {}
        lines.append(f"""
## Quantization on the dataset protocol (`quant_caches/mnist_unet/`)
`qua2sedimo eval-configs --model mnist_unet --fp16 --uniform mse-4,kmeans-4,kmeans_all-4,mse-3,kmeans-3,kmeans_all-3
--num_images 1000` with the shipped multiquantizer (`multiquantizers/mnist_unet_mq.safetensors`): {meta.get('num_images', '?')}
images, image seed {meta.get('image_seed', '?')} (image i: digit i % 10, noise seed `seed_for(42, i)`),
{meta.get('sampler', {}).get('dtype', '?')} on the GPU; FID-FP and PSNR are against the FP16 images of the same seeds.

| configuration | avg bits | MNIST-FID (1,000) | FID-FP | PSNR vs FP16 (dB) |
|---|---|---|---|---|
""")
        for name, r in scored["baselines"].items():
            lines[-1] += (f"| {name} | {r['avg_bits']:.3f} | {r['FID-GT-1k']:.2f} | {_fmt(r.get('FID-FP-1k'), '.2f')} | "
                          f"{_fmt(r.get('psnr_fp'), '.2f')} |\n")
        d = scored.get("dataset")
        if d:
            lines[-1] += (f"\nThe pre-scored dataset `quant_cache.pkl` ({d['configurations']} random configurations, "
                          f"configuration seed 0, the same protocol): MNIST-FID {d['fid_min']:.1f} - {d['fid_max']:.1f} "
                          f"(median {d['fid_median']:.1f}) at {d['avg_bits_min']:.2f} - {d['avg_bits_max']:.2f} average bits.\n")
        lines[-1] += ("\nThe FP16 figure differs between the two image sets (seeds i above, `seed_for(42, i)` here): "
                      "at 1,000 images LeNet-FID moves by several points with the seed set, as the real-digit floor "
                      "does; compare configurations on one protocol only.\n")
    lines.append("""
## Files
`model.safetensors` (fp16 state dict of `MNISTUNet`), `training.json` (training record and loss curve),
`quality.json` (the figures above). Load with `qua2sedimo` as family `mnist_unet`, or by hand:
`multiquant.mnist.train_unet.load_weights(multiquant.families.mnist_unet.build_unet(), path)`.
Code licence: the project's. Data licence: MNIST, CC BY-SA 3.0 (Y. LeCun, C. Cortes, C. Burges).
""")
    return "".join(lines)
