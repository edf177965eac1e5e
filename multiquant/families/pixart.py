"""PixArt-alpha and PixArt-Sigma (PixArtTransformer2DModel)."""
from . import FamilySpec, register_family

_FULL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
             cross_attention_dim=1152, caption_channels=4096, patch_size=2, norm_type="ada_norm_single",
             use_additional_conditions=False)
_TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
             cross_attention_dim=16, caption_channels=32, sample_size=8, patch_size=2,
             norm_type="ada_norm_single", use_additional_conditions=False)
_COMMON = dict(model_class="PixArtTransformer2DModel", subfolder="transformer", fp_prec=16,
               reference_fp_bytes=1_220_456_448, conditioning="text", prompt_source="coco", steps=20,
               guidance=4.5, tiny_config=_TINY)

register_family(FamilySpec(
    name="pixart_alpha", hub_id="PixArt-alpha/PixArt-XL-2-512x512", pipeline_class="PixArtAlphaPipeline",
    batch_size=16, text_tokens=120,
    full_config=dict(_FULL, sample_size=64), resolution=512, architecture="alpha",
    scheduler="DPMSolverMultistepScheduler", **_COMMON))

register_family(FamilySpec(
    name="pixart_sigma", hub_id="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", pipeline_class="PixArtSigmaPipeline",
    batch_size=4, text_tokens=300,
    full_config=dict(_FULL, sample_size=128), resolution=1024, architecture="sigma",
    scheduler="DPMSolverMultistepScheduler", pipeline_kwargs={"max_sequence_length": 300}, **_COMMON))
