"""The reverse process: a plain loop over any diffusers scheduler.

The pixel family samples with this loop rather than `DDPMPipeline.__call__`, which it exports: that loop passes
`generator=` to every `scheduler.step` (UniPC and PNDM take none: TypeError), never applies `init_noise_sigma`
or `scale_model_input` (Euler, Heun and LMS then sample from the wrong noise scale) and has no `eta`. On DDPM and
DDIM, where the pipeline works, the two draw the same images from the same generators."""

import inspect

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from diffusion_lab.core.schedulers import fit_for_pipelines


@torch.no_grad()
def sample_images(
    net: torch.nn.Module,
    scheduler,
    num_images: int,
    sample_shape: tuple[int, ...],
    *,
    num_inference_steps: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    eta: float = 0.0,
    class_labels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """Denoise Gaussian noise into `num_images` samples in [-1, 1] (unclipped network scale).

    `scheduler` is any diffusers scheduler that fits how `net` was trained (DDPM-family or flow-matching); it is set to `num_inference_steps` in place. A list of
    generators (one per image) makes each image depend on its own seed only, not on its batch. `eta` reaches
    the schedulers that take one (DDIM).
    """
    scheduler.set_timesteps(num_inference_steps, device=device)
    images = randn_tensor(
        (num_images, *sample_shape), generator=generator, device=torch.device(device), dtype=dtype
    )
    fit_for_pipelines(scheduler)
    images = images * scheduler.init_noise_sigma
    extra = {} if class_labels is None else {"class_labels": class_labels.to(device)}
    # Only stochastic schedulers take a generator, only DDIM an eta (as diffusers' own pipelines check).
    step_parameters = inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generator} if "generator" in step_parameters else {}
    if "eta" in step_parameters:
        step_kwargs["eta"] = eta
    for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
        model_input = scheduler.scale_model_input(images, t)
        output = net(model_input, t, **extra).sample
        images = scheduler.step(output, t, images, **step_kwargs).prev_sample
    return images
