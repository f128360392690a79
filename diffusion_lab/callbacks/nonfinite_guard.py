"""Stopping (or skipping) at the first non-finite loss or gradient, before it reaches the weights."""

import logging

import lightning as L
import torch

from diffusion_lab.errors import ConfigError

log = logging.getLogger(__name__)
ACTIONS = ("stop", "skip")


class Diverged(RuntimeError):
    """The loss or the gradients stopped being finite; the weights were left as they were before that step."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class NonFiniteGuard(L.Callback):
    """Checks the loss and the gradient norm of every optimizer step, before the optimizer applies it.

    `nonfinite=stop` raises `Diverged` (the run ends non-zero with status "diverged"; nothing after the last
    good checkpoint is saved or exported). `nonfinite=skip` drops that step's gradients, so the optimizer leaves
    the weights alone, counts it (`train/skipped_steps`), and stops after `max_consecutive` skips in a row.
    Under fp16 mixed precision the GradScaler already skips overflowing gradients and lowers its scale:
    there only the loss is checked.
    """

    def __init__(self, nonfinite: str = "stop", max_consecutive: int = 10) -> None:
        if nonfinite not in ACTIONS:
            raise ConfigError(f"guard.nonfinite={nonfinite!r}; valid: {', '.join(ACTIONS)}")
        if max_consecutive < 1:
            raise ConfigError(f"guard.max_consecutive must be at least 1, got {max_consecutive}")
        self.nonfinite = nonfinite
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._loss_finite: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.consecutive = state_dict["skipped"], state_dict["consecutive"]

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        # Accumulated micro-batches: the step is bad if any of its losses is.
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        finite = self._loss_finite if self._loss_finite is not None else torch.tensor(True)
        self._loss_finite = None
        gradients = [
            p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        if gradients and getattr(trainer.precision_plugin, "scaler", None) is None:
            finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(gradients, foreach=True)).to(
                finite.device
            )
        # One host sync per optimizer step; every rank takes the same decision (FSDP ranks see only their shard).
        if trainer.strategy.reduce_boolean_decision(bool(finite), all=True):
            self.consecutive = 0
            return
        step, loss = trainer.global_step + 1, float(self._loss) if self._loss is not None else float("nan")
        what = "loss" if not torch.isfinite(torch.tensor(loss)) else "gradients"
        if self.nonfinite == "stop" or self.consecutive + 1 >= self.max_consecutive:
            optimizer.zero_grad(set_to_none=True)
            run_length = f" ({self.consecutive + 1} bad steps in a row)" if self.nonfinite == "skip" else ""
            raise Diverged(f"non-finite {what} at step {step} (loss {loss}){run_length}", step)
        optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without gradients
        self.skipped += 1
        self.consecutive += 1
        log.warning(
            "non-finite %s at step %d (loss %s): step skipped (%d so far)", what, step, loss, self.skipped
        )
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, rank_zero_only=True)
