"""SDXL base, SD1.5 and SD1.4 U-Nets (UNet2DConditionModel)."""
from torch import nn

from . import FamilySpec, register_family


def _concat_splits(layer: str):
    """Split rule for up-block resnets, whose input is cat([hidden, skip], dim=1).

    The split falls at the true concat boundary (the hidden-state channels). The reference split SDXL's
    conv1 at out_channels instead, which is not the boundary for up_blocks.1.resnets.0; the keys and
    byte totals are the same either way."""

    def rule(model: nn.Module) -> dict[str, int]:
        splits = {}
        prev_out = model.mid_block.resnets[-1].out_channels if model.mid_block is not None else None
        for u, block in enumerate(model.up_blocks):
            out = block.resnets[0].out_channels
            for i, resnet in enumerate(block.resnets):
                hidden = prev_out if i == 0 else out
                conv = getattr(resnet, layer, None)
                if conv is not None and resnet.conv1.in_channels > hidden:
                    splits[f"up_blocks.{u}.resnets.{i}.{layer}"] = hidden
            prev_out = out
        return splits

    return rule


_SD1_FULL = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
_SD1_TINY = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4)
_SD1 = dict(model_class="UNet2DConditionModel", subfolder="unet", pipeline_class="StableDiffusionPipeline",
            batch_size=8, text_tokens=77,
            fp_prec=32, reference_fp_bytes=3_436_308_480, architecture="SDv1.5", resolution=512, steps=50,
            guidance=7.5, scheduler="PNDMScheduler", scheduler_kwargs={"skip_prk_steps": True},
            full_config=_SD1_FULL, tiny_config=_SD1_TINY,
            # q-diffusion's shortcut splitting: the 1x1 skip conv of every up-block resnet.
            split_rule=_concat_splits("conv_shortcut"),
            notes="Diffusers layout (the reference used ldm key names); fp32 as in the reference.")

register_family(FamilySpec(name="sdv15", hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5", **_SD1))
register_family(FamilySpec(name="sdv14", hub_id="CompVis/stable-diffusion-v1-4", **_SD1))

register_family(FamilySpec(
    name="sdxl", model_class="UNet2DConditionModel", hub_id="stabilityai/stable-diffusion-xl-base-1.0",
    subfolder="unet", variant="fp16", pipeline_class="StableDiffusionXLPipeline", fp_prec=16,
    batch_size=8, text_tokens=77,
    reference_fp_bytes=5_131_760_640, architecture="SDXL", resolution=512, steps=40, guidance=5.0,
    scheduler="EulerDiscreteScheduler",
    full_config=dict(sample_size=128, in_channels=4, out_channels=4,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                     transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                     use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816),
    tiny_config=dict(sample_size=16, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64),
                     layers_per_block=2, cross_attention_dim=32, transformer_layers_per_block=(1, 2),
                     attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=80),
    split_rule=_concat_splits("conv1"),
    refiner_hub_id="stabilityai/stable-diffusion-xl-refiner-1.0",
    notes="Base + refiner as in the reference: 32 quantized base steps, then 8 refiner steps kept FP16 "
          "(--no_refiner: the base runs all 40).",
))
