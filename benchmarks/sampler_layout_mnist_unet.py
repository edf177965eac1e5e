"""The bare sampling floor of one mnist_unet configuration (1,000 images, 50 steps, one sampler call) on a GPU, under
cuDNN autotuning and channels-last, with a profile of the default run.

    python benchmarks/sampler_layout_mnist_unet.py [--out DIR]      # writes sampler_layout_mnist_unet.json

Compare with the per-configuration time of a scoring run (benchmarks/results/pareto_mnist_unet.json timings).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, write_result  # noqa: E402
from multiquant.families import get_family  # noqa: E402
from multiquant.families.mnist_unet import SAMPLER, digit_conditions  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    out = environment()
    model = get_family("mnist_unet").load(dtype=torch.float16, device="cuda").eval()
    labels, seeds = digit_conditions(1000), list(range(1000))

    def timed(tag, reps=2):
        SAMPLER(model, labels[:100], seeds[:100])
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            img = SAMPLER(model, labels, seeds)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[tag] = {"seconds": min(times), "all": times, "first_pixels": img.flatten()[:8].tolist()}
        print(tag, times, flush=True)

    timed("default")
    activities = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        SAMPLER(model, labels, seeds)
        torch.cuda.synchronize()
    out["profile_top"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    torch.backends.cudnn.benchmark = True
    timed("cudnn_benchmark")
    model = model.to(memory_format=torch.channels_last)
    timed("channels_last_cudnn_benchmark")
    write_result("sampler_layout_mnist_unet", out, args.out)


if __name__ == "__main__":
    main()
