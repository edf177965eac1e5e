"""Shared helpers of the benchmark scripts: device/version info and JSON results."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from multiquant.utils import json_default, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    import diffusers

    info = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "cpu_count": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpus"] = torch.cuda.device_count()
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def full_size_vae(device, dtype, sample_size: int = 512):
    """The latent-diffusion VAE every family here decodes with (SD / PixArt / DiT AutoencoderKL: 8x, 4 latent
    channels), full size with seeded random weights."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device(device):
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=sample_size)
    return vae.to(dtype).eval()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args, **kwargs):
    sync()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return out, time.perf_counter() - t


def result_path(name: str, out_dir: str | Path | None = None) -> Path:
    """Where :func:`write_result` writes ``name``'s results."""
    return (Path(out_dir) if out_dir else RESULTS) / f"{name}.json"


def read_result(name: str, out_dir: str | Path | None = None) -> dict | None:
    """The results an earlier run wrote (:func:`write_result`), None when there are none; a benchmark that merges
    into its file reads it here."""
    path = result_path(name, out_dir)
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(name: str, result: dict, out_dir: str | Path | None = None, quiet: bool = False) -> Path:
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    text = json.dumps(result, indent=1, default=json_default)
    write_text_atomic(path, text)
    if not quiet:
        print(text)
    return path


def random_packed_weight(option: str, shape: tuple[int, ...], seed: int, table_scale: float = 0.05, device="cpu"):
    """A :class:`multiquant.packed.PackedWeight` on ``device`` with seeded random codes and tables (drawn on the
    CPU, packed on ``device``): latency does not depend on the values, and a decode must give the eager path's
    weight for any of them."""
    from multiquant.packed import PackedWeight
    from multiquant.packing import pack_codes

    g = torch.Generator().manual_seed(seed)
    part = PackedWeight(option, shape, device="cpu")
    codes = torch.randint(0, 2 ** part.bits, (part.numel,), generator=g, dtype=torch.uint8)
    if part.method == "mse":
        part.scale.copy_(torch.rand(shape[0], generator=g) * table_scale / 5 + 1e-3)
        part.zero.copy_(torch.randint(0, 2 ** part.bits, (shape[0],), generator=g))
    else:
        part.codebook.copy_(torch.randn(part.codebook.shape, generator=g) * table_scale)
    part = part.to(device)
    part.codes.copy_(pack_codes(codes.to(device), part.bits))
    return part
