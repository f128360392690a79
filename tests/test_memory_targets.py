"""The 24 GB target of experiment=flux_lora_24gb, measured where a CUDA GPU is present (skipped elsewhere).

A random transformer of Flux.1-dev's shape (11.9 B parameters: the default FluxTransformer2DModel config with the
guidance embedding) is written in bf16 and loaded as the run loads it: NF4 through bitsandbytes, LoRA rank 16 on
the family's targets with float32 adapters, gradient checkpointing, 8-bit AdamW, bf16 autocast; the batch is what
the latent and prompt caches hand it at 1024^2 px (16 x 128 x 128 latents, 512 T5 tokens, CLIP-L's pooled vector),
so no text encoder or VAE is on the card, as in the run. Two optimizer steps; the peak must stay under 24 GiB.
"""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_flux_dev_qlora_training_steps_peak_under_24_gib(tmp_path):
    pytest.importorskip("bitsandbytes")
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from diffusion_lab.core import FlowMatching
    from diffusion_lab.core.timesteps import LogitNormal
    from diffusion_lab.families import family_named
    from diffusion_lab.families.lora import add_lora
    from diffusion_lab.families.quantization import COMPUTE_DTYPE, quantization_config
    from diffusion_lab.models.optimization import adamw_8bit

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            full = FluxTransformer2DModel(guidance_embeds=True)  # Flux.1-dev's configuration
    finally:
        torch.set_default_dtype(default_dtype)
    assert sum(p.numel() for p in full.parameters()) > 11e9
    full.save_pretrained(tmp_path / "transformer")
    del full
    torch.cuda.empty_cache()

    flux = family_named("flux")
    net = FluxTransformer2DModel.from_pretrained(
        tmp_path / "transformer", quantization_config=quantization_config("nf4"), torch_dtype=COMPUTE_DTYPE
    ).to("cuda")
    add_lora(net, 16, 16, flux.lora_target_modules)
    net.enable_gradient_checkpointing()
    net.train()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
    objective = FlowMatching(scheduler, timesteps=LogitNormal())
    optimizer = adamw_8bit([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    x0 = torch.randn(1, 16, 128, 128, device="cuda")
    conditioning = {
        "encoder_hidden_states": torch.randn(1, 512, 4096, device="cuda", dtype=COMPUTE_DTYPE),
        "pooled_projections": torch.randn(1, 768, device="cuda", dtype=COMPUTE_DTYPE),
    }
    torch.cuda.reset_peak_memory_stats()
    for step in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective.loss(flux.denoiser(net, training_guidance=1.0), x0, [step], **conditioning)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"flux-dev NF4 QLoRA rank 16, 1024^2 px, batch 1: peak {peak:.2f} GiB")
    assert torch.isfinite(loss) and peak < 24
