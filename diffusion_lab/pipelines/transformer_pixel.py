"""A pixel-space DiT / SiT as a pipeline: unconditional or class-conditional. Self-contained (torch and diffusers
only): `diffusion-lab export` copies this file into the folder as `pipeline.py`, where
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` finds it through `model_index.json`, so the
folder loads without diffusion_lab installed (diffusers has no pixel-space DiT pipeline; `DiTPipeline` decodes
latents with a VAE):

    pipeline = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipeline(num_images=4).images                  # unconditional
    images = pipeline(class_labels=[0, 3, 7]).images        # class-conditional

The transformer is a stock `DiTTransformer2DModel` (one with a single class embedding is unconditional), or, for
learned position embeddings, which the stock class cannot hold, diffusion_lab's `DiffusionTransformer`: that
folder needs diffusion_lab installed.
"""

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class PixelTransformerPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def num_classes(self) -> int | None:
        config = self.transformer.config
        if "num_class_embeds" in config:  # diffusion_lab's DiffusionTransformer (learned position embeddings)
            return config.num_class_embeds
        return config.num_embeds_ada_norm if config.num_embeds_ada_norm > 1 else None

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | None = None,
        num_images: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """`num_images` images, or one per label in `class_labels` for a class-conditional model."""
        classes = self.num_classes
        if classes is None:
            if class_labels is not None:
                raise ValueError("this model is unconditional: it takes no class_labels")
            labels = torch.zeros(num_images, dtype=torch.long)
        else:
            if class_labels is None:
                raise ValueError(f"this model is class-conditional: pass class_labels in 0..{classes - 1}")
            labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else list(class_labels))
            if labels.numel() == 0 or labels.min() < 0 or labels.max() >= classes:
                raise ValueError(f"class_labels must be in 0..{classes - 1}, got {labels.tolist()}")
        config = self.transformer.config
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        device = self._execution_device
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        image = image * getattr(self.scheduler, "init_noise_sigma", 1.0)  # (flow-match schedulers have none)
        labels = labels.to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        stochastic = "generator" in inspect.signature(self.scheduler.step).parameters
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = image
            if hasattr(self.scheduler, "scale_model_input"):
                model_input = self.scheduler.scale_model_input(image, t)
            timesteps = torch.as_tensor(t, device=device).expand(len(labels))
            output = self.transformer(model_input, timestep=timesteps, class_labels=labels).sample
            extra = {"generator": generator} if stochastic else {}
            image = self.scheduler.step(output, t, image, **extra).prev_sample
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
