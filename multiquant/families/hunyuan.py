"""Hunyuan-DiT (HunyuanDiT2DModel)."""
from torch import nn

from . import FamilySpec, register_family


def _skip_linear_splits(model: nn.Module) -> dict[str, int]:
    # skip_linear sees cat([hidden, skip], -1): quantize the two halves independently (reference rule).
    return {name: module.in_features // 2 for name, module in model.named_modules()
            if name.endswith("skip_linear") and isinstance(module, nn.Linear)}


register_family(FamilySpec(
    name="hunyuan", model_class="HunyuanDiT2DModel", hub_id="Tencent-Hunyuan/HunyuanDiT-Diffusers",
    subfolder="transformer", pipeline_class="HunyuanDiTPipeline", batch_size=4, fp_prec=16,
    reference_fp_bytes=2_999_291_904, architecture="hunyuan", resolution=1024, steps=50, guidance=5.0,
    full_config=dict(num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2,
                     activation_fn="gelu-approximate", sample_size=128, hidden_size=1408, num_layers=40,
                     mlp_ratio=4.3637, learn_sigma=True, cross_attention_dim=1024, norm_type="layer_norm",
                     cross_attention_dim_t5=2048, pooled_projection_dim=1024, text_len=77, text_len_t5=256,
                     use_style_cond_and_image_meta_size=True),
    tiny_config=dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
                     activation_fn="gelu-approximate", sample_size=8, hidden_size=16, num_layers=6, mlp_ratio=2.0,
                     learn_sigma=True, cross_attention_dim=16, norm_type="layer_norm", cross_attention_dim_t5=32,
                     pooled_projection_dim=16, text_len=8, text_len_t5=8, use_style_cond_and_image_meta_size=True),
    # The attention pooler calls F.multi_head_attention_forward on raw weights: never a Linear forward,
    # so the reference leaves it FP16 and outside the search space.
    exclude=("time_extra_emb.pooler.*",),
    split_rule=_skip_linear_splits,
))
