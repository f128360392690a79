"""Output preservation without class images (ai-toolkit's "DOP", kohya's `sd3_train_network.py`, OneTrainer PR 505
"prior model preservation"; asked for in SimpleTuner issue 1031): on a preservation prompt (the class prompt),
the LoRA's prediction is pulled toward the base model's own prediction for the same noisy latents and timesteps,
so the class keeps looking as the base drew it while the trigger learns the subject. No class images are
generated; the price is two more network passes per batch (the base's, without gradient, and the LoRA's).
"""

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from diffusion_lab.errors import ConfigError


@contextlib.contextmanager
def adapters_disabled(net: torch.nn.Module) -> Iterator[None]:
    """Every LoRA scale at 0 (the base network) inside, restored on the way out, exception or not."""
    net.disable_adapters()
    try:
        yield
    finally:
        net.enable_adapters()


class OutputPreservation:
    """`loss(model, batch, x0, keys)`: the MSE between the LoRA-on prediction and the base's (no gradient), both
    under `preservation_prompt`, on the noisy inputs the main loss drew for the same keys; `weight` scales it."""

    def __init__(self, preservation_prompt: str | None = None, weight: float = 1.0) -> None:
        if not preservation_prompt:
            raise ConfigError(
                "model/preservation=output needs a prompt: model.preservation.preservation_prompt (by default "
                "data.class_prompt, e.g. 'a photo of a dog')"
            )
        if weight < 0:
            raise ConfigError(f"model.preservation.weight must be >= 0, got {weight}")
        self.preservation_prompt, self.weight = preservation_prompt, float(weight)

    def check(self, net: torch.nn.Module) -> None:
        if not getattr(net, "peft_config", None):
            raise ConfigError(
                "model/preservation=output turns the LoRA off for the base's prediction: set model.lora_rank"
            )

    def loss(self, model, batch: dict, x0: torch.Tensor, keys: list[int]) -> torch.Tensor:
        objective = model.objective
        prompts = model.encode_prompts([self.preservation_prompt] * len(keys))
        conditioning = model.family.conditioning(prompts, batch, model.net.dtype, model.device)
        times, noise = objective.draws(x0, keys)
        x_t, timesteps = objective.noisy(x0, noise, times), objective.network_timesteps(times)
        denoiser = model.denoiser()
        with torch.no_grad(), adapters_disabled(model.net):
            target = denoiser(x_t, timesteps, **conditioning).sample
        prediction = denoiser(x_t, timesteps, **conditioning).sample
        return F.mse_loss(prediction.float(), target.float())
