"""The bare sampling floor of one mnist_unet configuration (1,000 images, 50 steps, one sampler call) on a GPU, under
cuDNN autotuning and channels-last, with a profile of the default run.

    python benchmarks/sampler_layout_mnist_unet.py benchmarks/results/sampler_layout_mnist_unet.json

Compare with the per-configuration time of a scoring run (benchmarks/results/pareto_mnist_unet.json timings).
"""
import json, sys, time
import torch
from safetensors.torch import load_file
from multiquant.families.mnist_unet import build_unet, WEIGHTS, SAMPLER, digit_conditions

out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
model = build_unet()
model.load_state_dict(load_file(str(WEIGHTS)))
model = model.half().cuda().eval()
labels, seeds = digit_conditions(1000), list(range(1000))
params = sum(p.numel() for p in model.parameters())

def timed(tag, reps=2):
    SAMPLER(model, labels[:100], seeds[:100]); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); img = SAMPLER(model, labels, seeds); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    out[tag] = {"seconds": min(ts), "all": ts, "first_pixels": img.flatten()[:8].tolist()}
    print(tag, ts, flush=True)

timed("default")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
    SAMPLER(model, labels[:1000], seeds[:1000]); torch.cuda.synchronize()
out["profile_top"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
torch.backends.cudnn.benchmark = True
timed("cudnn_benchmark")
model = model.to(memory_format=torch.channels_last)
timed("channels_last_cudnn_benchmark")
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(out["profile_top"])
