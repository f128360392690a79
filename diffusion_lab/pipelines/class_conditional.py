"""A DDPMPipeline that takes class labels. Self-contained (torch and diffusers only): `diffusion-lab export`
copies this file into a class-conditional pipeline folder as `pipeline.py`, where
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` finds it through `model_index.json`
(`["pipeline", ...]`; diffusers asks for `trust_remote_code` before running code shipped in a folder), so the
folder loads without diffusion_lab installed:

    pipeline = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipeline(class_labels=[0, 3, 7], num_inference_steps=50).images
"""

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalDDPMPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int],
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """One image per label in `class_labels` (indices of the classes the UNet was trained on)."""
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else list(class_labels))
        classes = self.unet.config.num_class_embeds
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= classes:
            raise ValueError(f"class_labels must be in 0..{classes - 1}, got {labels.tolist()}")
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (len(labels), self.unet.config.in_channels, *size)
        device = self._execution_device
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        labels = labels.to(device)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_output = self.unet(image, t, class_labels=labels).sample
            image = self.scheduler.step(model_output, t, image, generator=generator).prev_sample
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
