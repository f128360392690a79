"""Diffusers noise schedulers by the short names researchers use."""

import diffusers

SCHEDULER_CLASSES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
}


def scheduler_from_name(name: str, training_config: dict, **overrides):
    """A sampling scheduler of the named kind, sharing the training schedule's betas and parametrisation."""
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_CLASSES)}")
    scheduler_class = getattr(diffusers, SCHEDULER_CLASSES[name])
    return scheduler_class.from_config(training_config, **overrides)
