"""Online token-wise activation quantization really runs, and changes outputs by the expected amount."""
import torch

from multiquant.activations import enable_activation_quant, quantize_activation, quantize_rows
from multiquant.families import get_family
from multiquant.adapters import example_inputs


def test_rowwise_error_is_half_a_step():
    x = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(0)).double()
    for bits in (8, 6, 4):
        step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2 ** bits - 1)
        err = (quantize_rows(x, bits) - x).abs()
        assert (err <= step / 2 + 1e-12).all()
        assert len(torch.unique(quantize_rows(x, bits)[0, 0])) <= 2 ** bits
    flat = torch.full((2, 5), 0.7)
    assert torch.isfinite(quantize_rows(flat, 8)).all()


def test_conv_inputs_get_one_range_per_sample_channel():
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    x[0, 1] *= 100  # a wide channel must not coarsen the others
    q = quantize_activation(x, 8)
    assert (q[0, 0] - x[0, 0]).abs().max() < 0.05


def test_hooks_change_denoiser_output_in_proportion_to_step():
    family = get_family("dit")
    torch.manual_seed(0)
    model = family.build("tiny").double()
    inputs = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in example_inputs(family, model, batch=2).items()}
    with torch.no_grad():
        ref = model(**inputs).sample
        rel = {}
        for bits in (8, 6):
            handles = enable_activation_quant(model, bits)
            out = model(**inputs).sample
            for h in handles:
                h.remove()
            rel[bits] = float((out - ref).norm() / ref.norm())
        restored = model(**inputs).sample
    assert rel[8] > 0  # it really runs
    # two fewer bits = a 4x coarser grid: the output error grows accordingly (noise adds, so 2x-8x)
    assert 2.0 < rel[6] / rel[8] < 8.0
    assert rel[6] < 0.2
    assert torch.equal(restored, ref)
