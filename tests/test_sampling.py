"""The sampling front: prompts, per-image seeding, batch invariance, weight sensitivity, embedding cache, and
parity with the stock diffusers pipelines (tiny random models, 2 steps, 64 px)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from multiquant.paths import constants
from multiquant.families import get_family
from multiquant.adapters.diffusers import embeddings as emb_mod
from multiquant.adapters.diffusers.embeddings import random_prompt_embeds
from multiquant.adapters.diffusers.loading import denoiser_of, stock_pipeline_class, tiny_pipeline
from multiquant.adapters.diffusers.prompts import class_labels, coco_prompts, conditions_for, parti_prompts
from multiquant.adapters.diffusers.sampling import make_sampler
from multiquant.seeds import image_generators, seed_for
from multiquant.utils import to_uint8

TEXT_FAMILIES = ["pixart_alpha", "pixart_sigma", "hunyuan", "sdxl", "sdv15"]
ALL_FAMILIES = TEXT_FAMILIES + ["dit", "mnist_dit"]
N = 4
STEPS = 2
COCO_FILE = Path(constants.COCO_2017_PROMPTS) if constants.COCO_2017_PROMPTS else None
PARTI_FILE = Path(constants.PARTI_PROMPTS) if constants.PARTI_PROMPTS else None


def transformers_available() -> bool:
    return stock_pipeline_class(get_family("sdv15"), required=False) is not None


needs_transformers = pytest.mark.skipif(not transformers_available(),
                                        reason="stock text-to-image pipelines need transformers (pip install '.[hub]')")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- prompts --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(COCO_FILE is None or not COCO_FILE.is_file(),
                    reason="COCO captions_val2017.json not found (../shared/data absent; set QUA2SEDIMO_COCO_CAPTIONS)")
def test_coco_prompts_are_the_first_annotations_in_file_order():
    prompts = coco_prompts()
    annotations = json.loads(COCO_FILE.read_text())["annotations"]
    assert len(prompts) == 1000
    assert prompts == [a["caption"] for a in annotations[:1000]]
    assert prompts[0] == "A black Honda motorcycle parked in front of a garage."
    assert len({a["image_id"] for a in annotations[:1000]}) < 1000  # captions, not distinct images
    assert conditions_for("pixart_alpha", 7) == prompts[:7]


def test_coco_prompts_keep_file_order_and_name_the_fix(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"annotations": [{"image_id": 9, "caption": "b  "}, {"image_id": 1, "caption": "a"}]}))
    assert coco_prompts(2, path) == ["b  ", "a"]
    with pytest.raises(ValueError, match="holds only 2"):
        coco_prompts(3, path)
    with pytest.raises(FileNotFoundError, match="QUA2SEDIMO_COCO_CAPTIONS.*--coco_path"):
        coco_prompts(2, tmp_path / "missing.json")


@pytest.mark.skipif(PARTI_FILE is None or not PARTI_FILE.is_file(),
                    reason="PartiPrompts.tsv not found (../shared/data absent)")
def test_parti_prompts():
    prompts = parti_prompts()
    assert len(prompts) == 1632 and prompts[0] == "bond"
    assert len(parti_prompts(3, category="Animals")) == 3


def test_class_labels_cycle_through_classes():
    assert class_labels("dit", 1000) == list(range(1000))
    mnist = class_labels("mnist_dit", 1000)
    assert mnist[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert all(mnist.count(d) == 100 for d in range(10))
    assert conditions_for("dit", 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="conditioned on 'text'"):
        class_labels("sdxl", 4)


def test_seed_for_is_deterministic_distinct_and_in_range():
    seeds = [seed_for(42, i) for i in range(1000)]
    assert seeds == [seed_for(42, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2 ** 63 for s in seeds)
    assert seed_for(43, 0) != seed_for(42, 0)


# -- the sampler on every family ------------------------------------------------------------------------------

def _sampler(family: str, pipe, **kwargs):
    if family in TEXT_FAMILIES:
        kwargs.setdefault("prompt_embeds", random_prompt_embeds(family, pipe, N, seed=1))
        kwargs.setdefault("conditions", [f"prompt {i}" for i in range(N)])
    kwargs.setdefault("steps", STEPS)
    return make_sampler(family, pipe, num_images=N, batch_size=N, **kwargs)


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def rendered(request):
    family = request.param
    pipe = tiny_pipeline(family, seed=0)
    sampler = _sampler(family, pipe)
    return family, pipe, sampler, sampler.generate(range(N))


def test_images_have_the_protocol_shape_and_are_not_blank(rendered):
    family, pipe, sampler, images = rendered
    channels, size = (1, 28) if family == "mnist_dit" else (3, 64)
    assert images.dtype == torch.uint8 and images.device.type == "cpu"
    assert images.shape == (N, channels, size, size)
    assert images.float().std() > 5  # not a constant image
    assert not torch.equal(images[0], images[1])  # different noise / conditions per image


def test_generation_is_deterministic(rendered):
    family, pipe, sampler, images = rendered
    assert torch.equal(sampler.generate(range(N)), images)


def test_an_image_does_not_depend_on_its_batch(rendered):
    family, pipe, sampler, images = rendered
    one_by_one = torch.cat([sampler.generate([i]) for i in range(N)])
    diff = (one_by_one.int() - images.int()).abs()
    # fp32 matmuls of different batch sizes round differently: at most a level or two on a few pixels.
    assert diff.max() <= 2 and (diff > 0).float().mean() < 0.01
    reordered = sampler.generate([3, 1])
    assert (reordered.int() - images[[3, 1]].int()).abs().max() <= 2


def test_new_denoiser_weights_change_the_images_and_restoring_them_restores_the_images(rendered):
    family, pipe, sampler, images = rendered
    denoiser = denoiser_of(pipe)
    saved = {k: v.clone() for k, v in denoiser.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in denoiser.parameters():  # in-place, as a quantization configuration is applied
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * (p.abs().mean() + 1e-3))
    changed = sampler.generate(range(N))
    denoiser.load_state_dict(saved)
    assert (changed.float() - images.float()).abs().mean() > 0.5
    assert torch.equal(sampler.generate(range(N)), images)


def test_settings_are_recorded(rendered):
    family, pipe, sampler, images = rendered
    settings = json.loads(json.dumps(sampler.settings))
    spec = get_family(family)
    assert settings["family"] == family and settings["steps"] == STEPS and settings["guidance"] == spec.guidance
    assert settings["seed"] == 42 and settings["batch_size"] == N and settings["num_images"] == N
    assert settings["scheduler"] == type(pipe.scheduler).__name__
    if spec.scheduler:
        assert settings["scheduler"] == spec.scheduler
    assert sampler.conditions == (class_labels(family, N) if spec.conditioning == "class"
                                  else [f"prompt {i}" for i in range(N)])


def test_mnist_channels_flag():
    pipe = tiny_pipeline("mnist_dit")
    native = _sampler("mnist_dit", pipe).generate([0, 1])
    rgb = _sampler("mnist_dit", pipe, channels=3).generate([0, 1])
    assert rgb.shape == (2, 3, 28, 28) and torch.equal(rgb[:, 1:2], native)
    with pytest.raises(ValueError, match="channels"):
        _sampler("mnist_dit", pipe, channels="rgb")


def test_seed_changes_the_noise():
    pipe = tiny_pipeline("dit")
    a = _sampler("dit", pipe).generate([0])
    b = _sampler("dit", pipe, seed=7).generate([0])
    assert not torch.equal(a, b)


def test_clear_errors():
    pipe = tiny_pipeline("sdv15")
    embeds = random_prompt_embeds("sdv15", pipe, N)
    del embeds["negative_prompt_embeds"]
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        _sampler("sdv15", pipe, prompt_embeds=embeds)
    with pytest.raises(ValueError, match="rows"):
        _sampler("sdv15", pipe, prompt_embeds=random_prompt_embeds("sdv15", pipe, N - 1))
    with pytest.raises(RuntimeError, match="prompt_embeds"):
        make_sampler("sdv15", pipe, conditions=["a", "b"])  # no text encoder, no embeddings
    with pytest.raises(IndexError, match="outside"):
        _sampler("sdv15", pipe).generate([N])
    with pytest.raises(ValueError, match="refiner"):
        _sampler("dit", tiny_pipeline("dit"), refiner=object())


# -- prompt embeddings: encoded once, cached ------------------------------------------------------------------

class _FakeSDEncoder:
    """Stands in for StableDiffusionPipeline.encode_prompt: embeddings derived from the prompt text."""

    def __init__(self, dim: int):
        self.dim, self.calls = dim, 0

    def embed(self, prompt: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(map(ord, prompt)) * 31 + len(prompt))
        return torch.randn(1, 8, self.dim, generator=g)

    def __call__(self, prompts, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None):
        self.calls += 1
        embeds = torch.cat([self.embed(p) for p in prompts])
        negative = torch.cat([self.embed("") for _ in prompts]) if do_classifier_free_guidance else None
        return embeds, negative


def _pipe_with_fake_encoder():
    pipe = tiny_pipeline("sdv15")
    fake = _FakeSDEncoder(denoiser_of(pipe).config.cross_attention_dim)
    pipe.encode_prompt = fake
    pipe.text_encoder = nn.Linear(1, 1)  # present, on the CPU already
    return pipe, fake


def test_prompt_embeddings_are_encoded_once_and_cached(tmp_path):
    prompts = [f"a photo of thing {i}" for i in range(N)]
    pipe, fake = _pipe_with_fake_encoder()
    first = make_sampler("sdv15", pipe, conditions=prompts, embed_cache_dir=tmp_path, steps=STEPS, batch_size=N)
    assert fake.calls == 2  # one chunk of prompts + the negative once
    assert first.prompt_embeds["prompt_embeds"].shape[0] == N
    assert first.prompt_embeds["negative_prompt_embeds"].shape[0] == 1
    assert torch.equal(first.prompt_embeds["prompt_embeds"][2], fake.embed(prompts[2])[0])
    assert len(list(tmp_path.glob("sdv15-*.safetensors"))) == 1

    images = first.generate(range(N))
    assert fake.calls == 2  # generating does not re-encode

    pipe2, fake2 = _pipe_with_fake_encoder()
    second = make_sampler("sdv15", pipe2, conditions=prompts, embed_cache_dir=tmp_path, steps=STEPS, batch_size=N)
    assert fake2.calls == 0  # served from the cache
    assert torch.equal(second.generate(range(N)), images)

    other = make_sampler("sdv15", pipe2, conditions=prompts[::-1], embed_cache_dir=tmp_path, steps=STEPS)
    assert fake2.calls == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2  # other prompts, other key
    assert torch.equal(other.prompt_embeds["prompt_embeds"][0], first.prompt_embeds["prompt_embeds"][N - 1])


def test_encoding_chunks_prompts(monkeypatch):
    pipe, fake = _pipe_with_fake_encoder()
    prompts = [f"p{i}" for i in range(5)]
    out = emb_mod.encode_prompts("sdv15", pipe, prompts, chunk_size=2)
    assert fake.calls == 3 + 1 and out["prompt_embeds"].shape[0] == 5
    assert torch.equal(out["prompt_embeds"][4], fake.embed("p4")[0])


# -- parity with the stock diffusers pipelines ----------------------------------------------------------------

def _stock_images(family: str, pipe, sampler, n: int) -> torch.Tensor:
    generators = image_generators(sampler.seed, range(n))
    if family == "dit":
        out = pipe(class_labels=sampler.conditions[:n], guidance_scale=sampler.guidance, generator=generators,
                   num_inference_steps=STEPS, output_type="pt").images
        return to_uint8(out)
    kwargs = {k: (v.expand(n, *v.shape[1:]) if k.startswith("negative_") else v[:n])
              for k, v in sampler.prompt_embeds.items()}
    if family.startswith("pixart"):
        kwargs["negative_prompt"] = None
    if family.startswith("pixart") or family == "hunyuan":
        kwargs["use_resolution_binning"] = False  # 64 px is no bin; the protocol's square sizes bin to themselves
    out = pipe(**kwargs, num_inference_steps=STEPS, guidance_scale=sampler.guidance, height=64, width=64,
               generator=generators, output_type="pt").images
    return to_uint8(out)


def test_dit_matches_the_stock_pipeline():
    pipe = tiny_pipeline("dit")
    # DiTPipeline hard-codes the ImageNet null class 1000: give the tiny denoiser 1000 classes.
    torch.manual_seed(0)
    config = dict(get_family("dit").tiny_config, num_embeds_ada_norm=1000)
    pipe.transformer = type(pipe.transformer)(**config).eval()
    sampler = _sampler("dit", pipe)
    ours, stock = sampler.generate(range(3)).int(), _stock_images("dit", pipe, sampler, 3).int()
    # Same noise, labels and schedule; float rounding in the stock loop may move a pixel across a uint8 step.
    diff = (ours - stock).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


@needs_transformers
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_text_families_match_the_stock_pipeline(family):
    pipe = tiny_pipeline(family)
    sampler = _sampler(family, pipe)
    assert torch.equal(sampler.generate(range(3)), _stock_images(family, pipe, sampler, 3))


def _tiny_tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<pad> <unk> <s> </s> a photo of cat dog red blue on the table".split()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>", model_max_length=max_length)


def _add_tiny_text_encoders(family: str, pipe):
    import transformers as tf

    torch.manual_seed(5)
    if family == "sdv15":
        dim = pipe.unet.config.cross_attention_dim
        pipe.text_encoder = tf.CLIPTextModel(tf.CLIPTextConfig(
            vocab_size=16, hidden_size=dim, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77)).eval()
        pipe.tokenizer = _tiny_tokenizer(77)
    elif family == "pixart_alpha":
        pipe.text_encoder = tf.T5EncoderModel(tf.T5Config(
            vocab_size=16, d_model=pipe.transformer.config.caption_channels, d_kv=8, d_ff=37, num_layers=2,
            num_heads=4)).eval()
        pipe.tokenizer = _tiny_tokenizer(120)
    return pipe


@needs_transformers
@pytest.mark.parametrize("family", ["sdv15", "pixart_alpha"])
def test_encoding_prompts_matches_the_stock_pipeline(family, tmp_path):
    pipe = _add_tiny_text_encoders(family, tiny_pipeline(family))
    prompts = ["a photo of a cat", "a red dog on the table", "blue"]
    sampler = make_sampler(family, pipe, conditions=prompts, embed_cache_dir=tmp_path, steps=STEPS, batch_size=2)
    kwargs = {"clean_caption": False, "use_resolution_binning": False} if family.startswith("pixart") else {}
    stock = pipe(prompt=prompts, num_inference_steps=STEPS, guidance_scale=sampler.guidance, height=64, width=64,
                 generator=image_generators(sampler.seed, range(3)), output_type="pt", **kwargs).images
    ours = sampler.generate(range(3))
    diff = (ours.int() - to_uint8(stock).int()).abs()
    assert diff.max() <= 2 and (diff > 0).float().mean() < 0.01  # embeddings encoded in a batch of 3 vs 1
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


# -- loading ----------------------------------------------------------------------------------------------------

def test_load_pipeline_from_a_local_directory_swaps_in_the_family_scheduler(tmp_path):
    from diffusers import DDIMScheduler

    from multiquant.adapters.diffusers.loading import load_pipeline

    pipe = tiny_pipeline("dit")
    pipe.scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0002, beta_end=0.03)
    pipe.save_pretrained(tmp_path / "dit")
    loaded = load_pipeline("dit", tmp_path / "dit", device="cpu")
    assert type(loaded.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert loaded.scheduler.config.beta_end == 0.03  # the checkpoint's noise schedule is kept
    assert loaded.transformer.dtype == torch.float32
    assert torch.equal(loaded.transformer.pos_embed.proj.weight, pipe.transformer.pos_embed.proj.weight)
    with pytest.raises(RuntimeError, match="--pretrained DIR"):
        load_pipeline("dit", tmp_path / "nowhere", device="cpu")


@pytest.mark.skipif(transformers_available(), reason="checks the message shown when transformers is missing")
def test_load_pipeline_without_transformers_names_the_fix():
    from multiquant.adapters.diffusers.loading import load_pipeline

    with pytest.raises(RuntimeError, match=r"qua2sedimo\[hub\]"):
        load_pipeline("pixart_alpha", device="cpu")


@needs_transformers
def test_sdxl_refiner_finishes_the_schedule_like_the_stock_pipelines():
    import diffusers

    from multiquant.adapters.diffusers.loading import tiny_scheduler, tiny_vae

    base = tiny_pipeline("sdxl")
    torch.manual_seed(1)  # refiner U-Net: 5 micro-conditioning ids (aesthetic score) + pooled 32
    unet = diffusers.UNet2DConditionModel(**dict(get_family("sdxl").tiny_config,
                                                 projection_class_embeddings_input_dim=72)).eval()
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=tiny_vae(1), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=tiny_scheduler("sdxl"), requires_aesthetics_score=True)
    refiner.set_progress_bar_config(disable=True)
    embeds = random_prompt_embeds("sdxl", base, N)
    embeds.update({"refiner_" + k: v for k, v in random_prompt_embeds("sdxl", refiner, N, seed=1).items()})
    sampler = _sampler("sdxl", base, prompt_embeds=embeds, refiner=refiner, steps=5)
    ours = sampler.generate(range(2))
    assert sampler.settings["refiner"] and sampler.settings["denoising_split"] == 0.8

    def expand(prefix):
        return {k[len(prefix):]: (v.expand(2, *v.shape[1:]) if "negative_" in k else v[:2])
                for k, v in embeds.items() if k.startswith(prefix) and (prefix or not k.startswith("refiner_"))}

    generators = image_generators(sampler.seed, range(2))
    latents = base(**expand(""), num_inference_steps=5, denoising_end=0.8, guidance_scale=sampler.guidance,
                   height=64, width=64, generator=generators, output_type="latent").images
    stock = refiner(image=latents, **expand("refiner_"), num_inference_steps=5, denoising_start=0.8,
                    guidance_scale=sampler.guidance, generator=generators, output_type="pt").images
    assert torch.equal(ours, to_uint8(stock))


# -- layout: one module per kind --------------------------------------------------------------------------------

def test_the_shared_diffusers_modules_reach_a_kind_only_through_its_adapter():
    """Everything one pipeline kind needs lives in its own module of multiquant/adapters/diffusers/; the shared
    base, loading, embeddings, loop, sampler and prompt sets never import a kind (docs/design.md §9)."""
    import ast

    folder = Path(__file__).resolve().parents[1] / "multiquant" / "adapters" / "diffusers"
    shared = {"__init__", "base", "loading", "embeddings", "loop", "sampling", "prompts"}
    kinds = {p.stem for p in folder.glob("*.py")} - shared
    assert kinds == {"pixart", "hunyuan", "sdxl", "sd", "dit", "mnist_dit"}
    package = "multiquant.adapters.diffusers"
    for name in sorted(shared - {"__init__"}):
        reached = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                reached.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(package + "."):
                reached.add(node.module[len(package) + 1:].split(".")[0])
            elif isinstance(node, ast.Import):
                reached.update(a.name[len(package) + 1:].split(".")[0] for a in node.names
                               if a.name.startswith(package + "."))
        assert not reached & kinds, f"{name}.py imports the kind module(s) {sorted(reached & kinds)}"
    from multiquant.adapters import ADAPTERS

    assert {type(a).__module__.rsplit(".", 1)[-1] for kind, a in ADAPTERS.items() if kind != "module"} == kinds
