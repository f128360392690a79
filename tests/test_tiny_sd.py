"""The tiny Stable Diffusion folder loads through the same from_pretrained paths as the real checkpoint."""

import json

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from diffusion_lab.families.tiny import build_tiny_sd
from tests.test_commands import cli


def test_tiny_sd_has_the_standard_layout_and_loads_component_by_component(tmp_path):
    path = build_tiny_sd(tmp_path / "tiny")
    assert {p.name for p in path.iterdir()} >= {
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "model_index.json",
    }
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    ids = tokenizer("a handwritten digit seven").input_ids
    assert (
        ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 6
    )  # whole words
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert unet.config.in_channels == vae.config.latent_channels


def test_tiny_sd_pipeline_generates_and_follows_the_prompt(tmp_path):
    pipeline = DiffusionPipeline.from_pretrained(build_tiny_sd(tmp_path / "tiny"))

    def generate(**kwargs):
        return pipeline(num_inference_steps=2, height=32, width=32, output_type="pt",
                        generator=torch.Generator().manual_seed(0), **kwargs).images  # fmt: skip

    first = generate(prompt="a red flower")
    assert first.shape == (1, 3, 32, 32)
    assert torch.equal(first, generate(prompt="a red flower"))
    assert not torch.equal(first, generate(prompt="a red flower", negative_prompt="blue"))


def test_tiny_sd_command(tmp_path):
    result = cli("tiny-sd", f"out_dir={tmp_path / 'tiny'}")
    assert json.loads(result.stdout.strip().splitlines()[-1])["tiny_sd"] == str(tmp_path / "tiny")
    assert (tmp_path / "tiny" / "model_index.json").exists()


def test_tiny_sdxl_has_the_sdxl_layout_and_generates_at_a_non_square_size(tmp_path, capsys):
    """Issue 14's builder: two text encoders (the second with a projection), a text_time UNet whose
    cross-attention takes both encoders' states, loaded part by part and as a StableDiffusionXLPipeline."""
    from omegaconf import OmegaConf
    from transformers import CLIPTextModelWithProjection

    from diffusion_lab.commands.tiny_sd import tiny_sd

    tiny_sd(
        OmegaConf.create({"out_dir": str(tmp_path / "sdxl"), "variant": "sdxl", "sample_size": 32, "seed": 0})
    )
    path = tmp_path / "sdxl"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["variant"] == "sdxl"
    assert {p.name for p in path.iterdir()} >= {"text_encoder_2", "tokenizer_2", "unet", "vae", "scheduler"}
    first = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    second = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.cross_attention_dim == first.config.hidden_size + second.config.hidden_size
    assert unet.config.projection_class_embeddings_input_dim == (
        second.config.projection_dim + 6 * unet.config.addition_time_embed_dim
    )
    pipeline = DiffusionPipeline.from_pretrained(path)
    assert type(pipeline).__name__ == "StableDiffusionXLPipeline"
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a red flower", negative_prompt="blue", num_inference_steps=2, height=32, width=48,
                     output_type="pt", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert image.shape == (1, 3, 32, 48) and torch.isfinite(image).all()


def test_tiny_transformer_families_build_offline_with_their_own_tokenizers_and_stock_diffusers_runs_them(
    tmp_path, capsys
):
    """`tiny-sd variant=sd3|flux|z_image`: each folder's tokenizers were written here (T5's unigram, Qwen's BPE with
    its chat template), reload as the hub's do, and the stock pipeline generates with the prompt mattering."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from diffusion_lab.commands.tiny_sd import tiny_sd

    expected = {"sd3": ("StableDiffusion3Pipeline", "tokenizer_3"), "flux": ("FluxPipeline", "tokenizer_2"),
                "z_image": ("ZImagePipeline", "tokenizer")}  # fmt: skip
    for variant, (pipeline_class, tokenizer_folder) in expected.items():
        path = tmp_path / variant
        tiny_sd(OmegaConf.create({"out_dir": str(path), "variant": variant, "sample_size": 32, "seed": 0}))
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["variant"] == variant
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder=tokenizer_folder)
        ids = tokenizer("a handwritten digit seven").input_ids
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a handwritten digit seven"
        pipeline = DiffusionPipeline.from_pretrained(path)
        assert type(pipeline).__name__ == pipeline_class and "transformer" in pipeline.components
        pipeline.set_progress_bar_config(disable=True)

        def generate(prompt, pipeline=pipeline):
            return pipeline(prompt, num_inference_steps=2, height=32, width=32, output_type="pt",
                            generator=torch.Generator().manual_seed(0)).images  # fmt: skip

        first = generate("a red flower")
        assert first.shape == (1, 3, 32, 32) and torch.equal(first, generate("a red flower"))
        assert not torch.equal(first, generate("a blue flower"))


def test_building_a_tiny_base_on_first_use_leaves_the_global_rng_as_it_was(tmp_path):
    """A run that builds its tiny base must initialise (LoRA, heads) as a rerun that finds it does."""
    from diffusion_lab.families.tiny import ensure_tiny_clip, ensure_tiny_sd

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ensure_tiny_sd(tmp_path / "sd")
    ensure_tiny_clip(tmp_path / "clip")
    assert torch.equal(torch.rand(3), expected)
