"""DiT-XL/2 (DiTTransformer2DModel), class-conditional on ImageNet."""
from . import FamilySpec, register_family

# diffusers keeps 28 identical copies of DiT's single timestep MLP (one per block): tie them to block 0.
DIT_TIES = ((r"transformer_blocks\.[1-9]\d*\.norm1\.emb\.timestep_embedder\.(linear_[12])",
             r"transformer_blocks.0.norm1.emb.timestep_embedder.\1"),)

register_family(FamilySpec(
    name="dit", model_class="DiTTransformer2DModel", hub_id="facebook/DiT-XL-2-512", subfolder="transformer",
    pipeline_class="DiTPipeline", batch_size=25, fp_prec=16, reference_fp_bytes=1_433_972_736, architecture="DiT",
    conditioning="class", prompt_source="imagenet_classes", num_classes=1000, resolution=512, steps=250,
    guidance=4.0, scheduler="DPMSolverMultistepScheduler",
    full_config=dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                     sample_size=64, patch_size=2, num_embeds_ada_norm=1000),
    tiny_config=dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                     sample_size=8, patch_size=2, num_embeds_ada_norm=10),
    ties=DIT_TIES,
    notes="Reference protocol: 250 DPM-Solver steps, one image per ImageNet class.",
))
