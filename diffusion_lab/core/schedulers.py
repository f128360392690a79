"""Diffusers noise schedulers by the short names researchers use."""

import diffusers
import torch

from diffusion_lab.compat.diffusers import explicit_config
from diffusion_lab.errors import ConfigError

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


# The same words for a flow-matching model (rectified flow, velocity prediction): the flow variants.
FLOW_SCHEDULERS: dict[str, tuple[str, dict]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "dpm++": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_flow_sigmas": True, "prediction_type": "flow_prediction"},
    ),
    "unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}
# What `scheduler: null` (the default of `sample` and the callbacks) means for each family.
DEFAULT_SCHEDULER = {
    "ddpm": "ddim",
    "flow": "unipc",
}  # flow: the best at every step count (experiments/sampler_table)


def check_scheduler_name(name: str | None) -> str | None:
    """A name some model can sample with (None: the model's default); whether it fits *this* model is
    decided when the scheduler is built (`scheduler_from_name`)."""
    if name is not None and name not in SCHEDULERS and name not in FLOW_SCHEDULERS:
        valid = ", ".join(dict.fromkeys([*SCHEDULERS, *FLOW_SCHEDULERS]))
        raise ValueError(f"unknown scheduler {name!r}; valid names: {valid}")
    return name


def flow_settings(config) -> dict | None:
    """{num_train_timesteps, shift} when a scheduler config describes a flow-matching schedule (a
    FlowMatch* scheduler, or a multistep solver with flow sigmas, as exported pipelines carry); else None."""
    config = dict(config)
    if config.get("use_flow_sigmas"):
        return {"num_train_timesteps": config["num_train_timesteps"], "shift": config.get("flow_shift", 1.0)}
    if "shift" in config and "beta_schedule" not in config:
        settings = {"num_train_timesteps": config["num_train_timesteps"], "shift": config["shift"]}
        if config.get("use_dynamic_shifting"):  # the shift follows resolution (Flux): its fields travel too
            settings.update({key: config[key] for key in DYNAMIC_SHIFT_FIELDS if key in config})
        return settings
    return None


DYNAMIC_SHIFT_FIELDS = ("use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
                        "max_image_seq_len", "time_shift_type")  # fmt: skip


def scheduler_from_name(name: str | None, training_config: dict, **overrides):
    """A sampling scheduler of the named kind, sharing the training schedule's betas and parametrisation (so the
    same model samples the same way from a checkpoint and from its exported pipeline). A flow-matching model
    gets the flow variant of the name, with its shift; a name that does not fit the model is refused with
    those that do. None picks the model's default (DDIM, or UniPC on flow sigmas)."""
    check_scheduler_name(name)
    flow = flow_settings(training_config)
    if name is None:
        name = DEFAULT_SCHEDULER["flow" if flow else "ddpm"]
    if flow is not None:
        return _flow_scheduler(name, flow, overrides)
    if name not in SCHEDULERS:
        raise ConfigError(
            f"scheduler {name!r} does not fit a DDPM-trained model; use one of {', '.join(SCHEDULERS)}"
        )
    class_name, variant = SCHEDULERS[name]
    scheduler_class = getattr(diffusers, class_name)
    if has_zero_terminal_snr(training_config) and not _supports_zero_terminal_snr(scheduler_class):
        fitting = [
            other
            for other, (cls, _) in SCHEDULERS.items()
            if _supports_zero_terminal_snr(getattr(diffusers, cls))
        ]
        raise ConfigError(
            f"scheduler {name!r} ({class_name}) cannot sample a zero-terminal-SNR model (it has no "
            f"rescale_betas_zero_snr and would divide by the last step's zero signal); use one of {', '.join(fitting)}"
        )
    return scheduler_class.from_config(explicit_config(training_config), **{**variant, **overrides})


def fit_for_pipelines(scheduler):
    """Flow-match Euler / Heun start from unit noise and scale no inputs, so they have neither
    `init_noise_sigma` nor `scale_model_input`; diffusers' Stable Diffusion pipeline (and our loop) read both
    every run. Give them the identity they mean."""
    if not hasattr(scheduler, "init_noise_sigma"):
        scheduler.init_noise_sigma = 1.0
    if not hasattr(scheduler, "scale_model_input"):
        scheduler.scale_model_input = lambda sample, *args, **kwargs: sample
    return scheduler


def _flow_scheduler(name: str, flow: dict, overrides: dict):
    if name not in FLOW_SCHEDULERS:
        raise ConfigError(
            f"scheduler {name!r} does not fit a flow-matching model (it samples the DDPM noise process); "
            f"use one of {', '.join(FLOW_SCHEDULERS)}"
        )
    if flow.get("use_dynamic_shifting") and name != "euler":
        raise ConfigError(
            f"scheduler {name!r}: this model's shift follows resolution (use_dynamic_shifting), which its pipeline "
            "passes to flow-match Euler only; use scheduler=euler (or null)"
        )
    class_name, variant = FLOW_SCHEDULERS[name]
    scheduler_class = getattr(diffusers, class_name)
    if variant.get("use_flow_sigmas"):  # the multistep solvers call the shift flow_shift
        settings = {"num_train_timesteps": flow["num_train_timesteps"], "flow_shift": flow["shift"]}
    else:
        settings = dict(flow)
    return fit_for_pipelines(scheduler_class.from_config({**settings, **variant, **overrides}))


def _supports_zero_terminal_snr(scheduler_class) -> bool:
    import inspect

    return "rescale_betas_zero_snr" in inspect.signature(scheduler_class.__init__).parameters


def sigmoid_alpha_bar_betas(
    num_train_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0
) -> torch.Tensor:
    """Betas whose alpha-bar follows a sigmoid (Jabri et al. 2022, arXiv:2212.11972, Fig. 8): the default
    schedule of denoising_diffusion_pytorch 2.x (`sigmoid_beta_schedule`). Not diffusers' `sigmoid`, which is a
    sigmoid in beta itself."""
    t = torch.linspace(0, 1, num_train_timesteps + 1, dtype=torch.float64)
    v_start, v_end = torch.tensor(start / tau).sigmoid(), torch.tensor(end / tau).sigmoid()
    alpha_bar = (-((t * (end - start) + start) / tau).sigmoid() + v_end) / (v_end - v_start)
    alpha_bar = alpha_bar / alpha_bar[0]
    return torch.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0, 0.999)


def ddpm_sigmoid_alpha_bar(
    num_train_timesteps: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0, **config
):
    """A DDPMScheduler on `sigmoid_alpha_bar_betas` (stored as `trained_betas`, so the schedule travels with
    checkpoints, samplers and exported pipelines)."""
    betas = sigmoid_alpha_bar_betas(num_train_timesteps, start, end, tau)
    return diffusers.DDPMScheduler(
        num_train_timesteps=num_train_timesteps, trained_betas=betas.tolist(), **config
    )


def with_zero_terminal_snr(noise_scheduler):
    """The schedule of Lin et al. 2024 (arXiv:2305.08891, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed"): betas rescaled so the last timestep is pure noise (§3.1), and `trailing` timestep spacing so
    every sampler starts from that last timestep (§3.3; `leading` DDIM-50 starts at t = 980). At t = T the
    epsilon target carries no information about the image, so the paper trains with v-prediction (§3.2):
    epsilon is refused. Classifier-free guidance then needs rescaling (§3.4): `SampleSettings.guidance_rescale`."""
    rescaled = type(noise_scheduler).from_config(
        explicit_config(noise_scheduler.config), rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
    if rescaled.config.prediction_type == "epsilon":
        raise ConfigError(
            "zero terminal SNR needs a prediction that is defined at pure noise: set "
            "model.noise_scheduler.prediction_type=v_prediction; with epsilon the last timestep's target says nothing about the image "
            "(arXiv:2305.08891, section 3.2)"
        )
    return rescaled


def has_zero_terminal_snr(scheduler_config) -> bool:
    return bool(dict(scheduler_config).get("rescale_betas_zero_snr"))
