"""Diffusers noise schedulers by the short names researchers use."""

import diffusers

# name -> (diffusers class, config overrides that make the variant)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),  # eta (0 = deterministic DDIM, 1 = DDPM-like) is a sampling setting
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    # The SDE variant of DPM-Solver++(2M): stochastic, needs no torchsde (unlike DPMSolverSDEScheduler).
    "dpm++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}


def check_scheduler_name(name: str) -> str:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}")
    return name


def scheduler_from_name(name: str, training_config: dict, **overrides):
    """A sampling scheduler of the named kind, sharing the training schedule's betas and parametrisation."""
    check_scheduler_name(name)
    class_name, variant = SCHEDULERS[name]
    # Every training value counts as set: a live scheduler remembers which of its values were defaults
    # (`_use_default_values`, then replaced by the new class's defaults), a reloaded pipeline's does not, and
    # the same model must sample the same way from a checkpoint and from its exported pipeline.
    config = {key: value for key, value in dict(training_config).items() if key != "_use_default_values"}
    return getattr(diffusers, class_name).from_config(config, **{**variant, **overrides})
