"""Exponential moving average of the trainable network, as a Lightning callback around diffusers' EMAModel."""

import contextlib
from collections.abc import Iterator

import lightning as L
import torch
from diffusers.training_utils import EMAModel

from diffusion_lab.core.power_ema import power_ema_beta, sigma_rel_to_gamma


class PowerEMAModel(EMAModel):
    """diffusers' EMAModel with EDM2's power-function profile (arXiv:2312.02696 eq. 2): beta_t = (1 - 1/t)^(gamma + 1),
    an average whose length is a fixed fraction `sigma_rel` of the run so far, whatever the run's length."""

    def __init__(self, parameters, gamma: float, **kwargs) -> None:
        super().__init__(parameters, **kwargs)
        self.gamma = gamma

    def get_decay(self, optimization_step: int) -> float:
        return power_ema_beta(max(optimization_step, 1), self.gamma)


class EMA(L.Callback):
    """Average the trainable weights of `pl_module.net` (never a frozen VAE or text encoder; of a LoRA
    UNet, the adapters).

    Every rank keeps its own copy; DDP keeps the weights identical across ranks, so the copies are too, and
    rank 0's is the one checkpointed. The average is swapped in for validation (samples, val/loss) and used
    for the final grid and the export.

    The average is kept in float32 whatever the training precision: under `bf16-true` a bf16 average of a
    weight drifting 1.0 -> 1.2 at decay 0.995 never moves (each update is below bf16's resolution at 1.0).
    Its warm-up and `update_after_step` count optimizer steps, whatever `update_every` is, as ema-pytorch
    does (diffusers' EMAModel counts its own calls: with `update_every=10` its warm-up took ten times longer).
    `sigma_rel` replaces the decay and its warm-up by EDM2's power-function profile of that relative length,
    the form post-hoc EMA measures (`diffusion-lab ema`), so a length found there is used as it was found.
    """

    def __init__(
        self,
        decay: float = 0.995,
        update_every: int = 1,
        update_after_step: int = 0,
        use_ema_warmup: bool = False,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        validate_with_ema: bool = True,
        sigma_rel: float | None = None,
    ) -> None:
        if sigma_rel is not None and update_every != 1:
            raise ValueError(
                f"callbacks.ema.sigma_rel={sigma_rel} is a power-function EMA updated every optimizer step: "
                f"leave callbacks.ema.update_every at 1 (got {update_every})"
            )
        self.gamma = None if sigma_rel is None else sigma_rel_to_gamma(sigma_rel)
        self.hyperparameters = dict(
            decay=decay,
            update_after_step=update_after_step,
            use_ema_warmup=use_ema_warmup,
            inv_gamma=inv_gamma,
            power=power,
            min_decay=float(min_decay),
        )
        self.update_every = update_every
        self.validate_with_ema = validate_with_ema
        self.ema: EMAModel | None = None
        self._state_to_load: dict | None = None
        self._last_step = 0
        self._swapped = False
        self._validation_context: contextlib.AbstractContextManager | None = None

    @property
    def state_key(self) -> str:
        return "EMA"

    def parameters(self, pl_module: L.LightningModule) -> list[torch.nn.Parameter]:
        return trainable_parameters(pl_module)

    def _ensure_ema(self, pl_module: L.LightningModule) -> EMAModel:
        if self.ema is None:
            # foreach: one fused kernel per update instead of one per tensor.
            parameters = self.parameters(pl_module)
            if self.gamma is None:
                self.ema = EMAModel(parameters, foreach=True, **self.hyperparameters)
            else:
                self.ema = PowerEMAModel(parameters, gamma=self.gamma, foreach=True)
        if self._state_to_load is not None:
            self.ema.load_state_dict(self._state_to_load)
            self._state_to_load = None
        self.ema.to(device=pl_module.device, dtype=torch.float32)
        return self.ema

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ensure_ema(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After checkpoint restore, so a resumed run does not take its first micro-batch for a step.
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Average after optimizer steps only (not after each accumulation micro-batch).
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        if trainer.global_step % self.update_every == 0:
            ema = self._ensure_ema(pl_module)
            ema.optimization_step = (
                trainer.global_step - 1
            )  # step() adds one: the decay of this optimizer step
            ema.step(self.parameters(pl_module))

    @contextlib.contextmanager
    def averaged_weights(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Temporarily load the averaged weights into the network."""
        if self._swapped:  # already inside (e.g. export during validation)
            yield
            return
        ema, parameters = self._ensure_ema(pl_module), self.parameters(pl_module)
        ema.store(parameters)
        ema.copy_to(parameters)
        self._swapped = True
        try:
            yield
        finally:
            ema.restore(parameters)
            self._swapped = False

    def copy_average_to(self, parameters: list[torch.nn.Parameter]) -> None:
        """The average into `parameters` of another copy of the network (SRA's teacher): same order as the
        trainable ones it tracks."""
        if self.ema is None:
            raise RuntimeError("the EMA has not started yet (it starts with fit)")
        self.ema.copy_to(parameters)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.validate_with_ema and trainer.state.fn == "fit":
            self._validation_context = self.averaged_weights(pl_module)
            self._validation_context.__enter__()

    def on_validation_end(self, trainer, pl_module) -> None:
        context = self._validation_context
        if context is not None:
            self._validation_context = None
            context.__exit__(None, None, None)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Stopped mid-validation (SIGTERM): the raw weights go back before a checkpoint is written.
        self.on_validation_end(trainer, pl_module)

    def state_dict(self) -> dict:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = {k: v for k, v in state_dict.items() if k != "target"}  # written by older versions
        if state_dict:
            self._state_to_load = state_dict
            if self.ema is not None:  # restored after setup (FSDP, DeepSpeed): keep it on the weights' device
                device = self.ema.shadow_params[0].device
                self.ema.load_state_dict(state_dict)
                self.ema.to(device=device, dtype=torch.float32)
                self._state_to_load = None


def trainable_parameters(pl_module: L.LightningModule) -> list[torch.nn.Parameter]:
    """What an average tracks: the trainable weights of the network (never a frozen VAE or text encoder; of a
    LoRA UNet, the adapters)."""
    return [parameter for parameter in pl_module.net.parameters() if parameter.requires_grad]


def trainable_names(net: torch.nn.Module) -> list[str]:
    """The names of `trainable_parameters`, in the same order."""
    return [name for name, parameter in net.named_parameters() if parameter.requires_grad]


@torch.no_grad()
def write_weights(net: torch.nn.Module, names: list[str], tensors: list[torch.Tensor]) -> None:
    """`tensors` into the parameters `names` (e.g. `trainable_names`), in each parameter's dtype and device."""
    parameters = dict(net.named_parameters())
    for name, tensor in zip(names, tensors, strict=True):
        parameters[name].copy_(tensor.to(parameters[name]))


def find_ema(trainer: L.Trainer) -> EMA | None:
    return next((callback for callback in trainer.callbacks if isinstance(callback, EMA)), None)


def ema_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> contextlib.AbstractContextManager:
    """The EMA weights if an EMA callback is attached, else the raw weights."""
    ema = find_ema(trainer)
    return ema.averaged_weights(pl_module) if ema is not None else contextlib.nullcontext()
