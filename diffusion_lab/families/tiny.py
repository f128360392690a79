"""A randomly initialised Stable Diffusion folder in the standard layout, small enough for a CPU.

Tests, CI and CPU users fine-tune it through exactly the `from_pretrained(path, subfolder=...)` path the
real checkpoint takes; nothing is downloaded. The tokenizers are written in code (`tiny_tokenizers`).
"""

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffusion_lab.families.tiny_tokenizers import (
    write_tiny_clip_tokenizer,
    write_tiny_qwen_tokenizer,
    write_tiny_t5_tokenizer,
)
from diffusion_lab.runs.atomic import write_folder


def build_tiny_sd(out_dir: str | Path, sample_size: int = 32, seed: int = 0) -> Path:
    """Write `unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json` to `out_dir` (atomically).

    `sample_size` is the image size in pixels; the VAE downsamples by 2, so latents are sample_size / 2.
    """
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as vocabulary:
        tokenizer = write_tiny_clip_tokenizer(Path(vocabulary))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[16, 32],
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size,
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=[32, 64],
        layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    # Stable Diffusion 1.x's training schedule.
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
        clip_sample=False, prediction_type="epsilon", steps_offset=1,
    )  # fmt: skip
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    return write_folder(out_dir, pipeline.save_pretrained)


def build_tiny_sdxl(out_dir: str | Path, sample_size: int = 32, seed: int = 0) -> Path:
    """The SDXL layout (issue 14): `text_encoder/` (CLIPTextModel) + `text_encoder_2/`
    (CLIPTextModelWithProjection) and their tokenizers, a UNet whose cross-attention takes both encoders'
    penultimate states concatenated and whose `text_time` embedding takes the second encoder's pooled output
    and the six micro-conditioning numbers, the VAE, and SDXL base's Euler scheduler config."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as vocabulary:
        tokenizer = write_tiny_clip_tokenizer(Path(vocabulary) / "one")
        tokenizer_2 = write_tiny_clip_tokenizer(Path(vocabulary) / "two")

    def text_config(hidden_size: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77, projection_dim=hidden_size,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip

    text_encoder, text_encoder_2 = (
        CLIPTextModel(text_config(32)),
        CLIPTextModelWithProjection(text_config(32)),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], block_out_channels=[16, 32], latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=sample_size, scaling_factor=0.13025,
    )  # fmt: skip
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2, in_channels=4, out_channels=4, block_out_channels=[32, 64],
        layers_per_block=1, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=64, attention_head_dim=4,
        norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_embed_dim, use_linear_projection=True,
    )  # fmt: skip
    # SDXL base 1.0's scheduler config: scaled-linear betas, epsilon, leading spacing with offset 1.
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )  # fmt: skip
    return write_folder(out_dir, pipeline.save_pretrained)


def build_tiny_clip(out_dir: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny random CLIP (vision + text towers, processor) saved like a hub CLIP: the offline stand-in for
    `openai/clip-vit-large-patch14` in CLIP-score tests, loaded by the same `from_pretrained` calls."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as vocabulary:
        tokenizer = write_tiny_clip_tokenizer(Path(vocabulary))
    tower = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **tower),
        vision_config=dict(image_size=image_size, patch_size=8, **tower),
        projection_dim=32,
    )  # fmt: skip
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    model, processor = CLIPModel(config), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    return write_folder(out_dir, save)


def ensure_tiny_clip(out_dir: str | Path, image_size: int = 32, seed: int = 0) -> str:
    """The tiny CLIP folder, built first if it is not there yet (configs use it as `clip_model`)."""
    out_dir = Path(out_dir)
    if not (out_dir / "model.safetensors").exists():
        with torch.random.fork_rng(devices=[]):
            build_tiny_clip(out_dir, image_size=image_size, seed=seed)
    return str(out_dir)


def ensure_tiny_sd(out_dir: str | Path, sample_size: int = 32, seed: int = 0, variant: str = "sd") -> str:
    """The folder, built first if it is not there yet (configs use it as `pretrained`); `variant` names the
    family (sd | sdxl)."""
    from diffusion_lab.families.registry import family_named

    out_dir = Path(out_dir)
    if not (out_dir / "model_index.json").exists():
        try:  # (in a forked RNG: a run that builds its base must draw what a rerun that finds it draws)
            with torch.random.fork_rng(devices=[]):
                family_named(variant).build_tiny(out_dir, sample_size=sample_size, seed=seed)
        except OSError:  # another process (a DDP rank) renamed its copy into place first
            if not (out_dir / "model_index.json").exists():
                raise
    return str(out_dir)


def ensure_tiny_vae(out_dir: str | Path, sample_size: int = 32, seed: int = 0) -> str:
    """The VAE folder of a tiny SD checkpoint (built first if need be): a frozen VAE for a latent DiT on a CPU."""
    return str(Path(ensure_tiny_sd(out_dir, sample_size=sample_size, seed=seed)) / "vae")


def _tiny_flow_vae(sample_size: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """SD3's / Flux's VAE layout: 16 latent channels, no quant convs, a shift as well as a scale."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], block_out_channels=[16, 32], latent_channels=16,
        layers_per_block=1, norm_num_groups=8, sample_size=sample_size, use_quant_conv=False,
        use_post_quant_conv=False, scaling_factor=scaling_factor, shift_factor=shift_factor,
    )  # fmt: skip


def _tiny_clip(tokenizer, hidden_size: int, projection: bool):
    from transformers import CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77, projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _tiny_t5(tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4, vocab_size=len(tokenizer),
                 feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
    )  # fmt: skip


def build_tiny_sd3(out_dir: str | Path, sample_size: int = 32, seed: int = 0) -> Path:
    """SD3's layout (arXiv:2403.03206): `transformer/` (MMDiT), CLIP-L and CLIP-G with projections, T5 as
    `text_encoder_3/`, the 16-channel VAE and FlowMatchEuler with shift 3 (SD3 medium / 3.5's config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as vocabulary:
        tokenizer = write_tiny_clip_tokenizer(Path(vocabulary) / "clip")
        tokenizer_3 = write_tiny_t5_tokenizer(Path(vocabulary) / "t5")
    # the CLIP states (2 x 32) are padded to T5's width (64), as SD3 pads 2 x 768 + 1280 to 4096
    transformer = SD3Transformer2DModel(
        sample_size=sample_size // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
        pooled_projection_dim=64, pos_embed_max_size=sample_size,
    )  # fmt: skip
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_flow_vae(sample_size, 1.5305, 0.0609), text_encoder=_tiny_clip(tokenizer, 32, True),
        tokenizer=tokenizer, text_encoder_2=_tiny_clip(tokenizer, 32, True), tokenizer_2=tokenizer,
        text_encoder_3=_tiny_t5(tokenizer_3, 64), tokenizer_3=tokenizer_3,
    )  # fmt: skip
    return write_folder(Path(out_dir), pipeline.save_pretrained)


def build_tiny_flux(out_dir: str | Path, sample_size: int = 32, seed: int = 0) -> Path:
    """Flux.1-dev's layout: `transformer/` (double- and single-stream blocks, guidance embedding), CLIP-L
    (pooled) and T5, the 16-channel VAE and FlowMatchEuler with dynamic shifting (mu from the image's sequence
    length, base 0.5 at 256 tokens to 1.15 at 4096)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as vocabulary:
        tokenizer = write_tiny_clip_tokenizer(Path(vocabulary) / "clip")
        tokenizer_2 = write_tiny_t5_tokenizer(Path(vocabulary) / "t5")
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    pipeline = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_tiny_flow_vae(sample_size, 0.3611, 0.1159),
        text_encoder=_tiny_clip(tokenizer, 32, False), tokenizer=tokenizer,
        text_encoder_2=_tiny_t5(tokenizer_2, 32), tokenizer_2=tokenizer_2,
    )  # fmt: skip
    return write_folder(Path(out_dir), pipeline.save_pretrained)


def build_tiny_z_image(out_dir: str | Path, sample_size: int = 32, seed: int = 0) -> Path:
    """Z-Image's layout (Tongyi-MAI, 2025): `transformer/` (a single-stream DiT over image and caption tokens,
    caption refiner layers, 3-axis rotary embeddings), Qwen3 as `text_encoder/` (its second-to-last hidden states,
    prompt in Qwen's chat template) with its tokenizer, Flux's 16-channel VAE and FlowMatchEuler with shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as vocabulary:
        tokenizer = write_tiny_qwen_tokenizer(Path(vocabulary))
    text_encoder = Qwen3Model(
        Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                    pad_token_id=tokenizer.pad_token_id)
    )  # fmt: skip
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )  # fmt: skip
    pipeline = ZImagePipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_flow_vae(sample_size, 0.3611, 0.1159), text_encoder=text_encoder, tokenizer=tokenizer,
    )  # fmt: skip
    return write_folder(Path(out_dir), pipeline.save_pretrained)
