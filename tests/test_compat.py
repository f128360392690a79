"""The private APIs fenced in `diffusion_lab.compat`: each behaves as the code relies on. A library update that
changes one fails here, naming it, instead of somewhere deep in a run."""

from importlib.metadata import version

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.compat import datasets as compat_datasets
from diffusion_lab.compat import diffusers as compat_diffusers
from diffusion_lab.compat import hydra as compat_hydra
from diffusion_lab.compat import lightning as compat_lightning
from diffusion_lab.compat import omegaconf as compat_omegaconf
from diffusion_lab.compat import torch_fidelity as compat_torch_fidelity


@pytest.mark.parametrize(
    ("module", "distribution"),
    [
        (compat_diffusers, "diffusers"),
        (compat_datasets, "datasets"),
        (compat_omegaconf, "omegaconf"),
        (compat_hydra, "hydra-core"),
        (compat_torch_fidelity, "torch-fidelity"),
        (compat_lightning, "lightning"),
    ],
)
def test_the_installed_version_is_the_one_checked(module, distribution):
    assert version(distribution).startswith(module.TESTED), (
        f"{distribution} {version(distribution)}: re-check diffusion_lab/compat/{module.__name__.rsplit('.', 1)[-1]}.py"
    )


def test_diffusers_reverts_a_default_listed_value_and_explicit_config_keeps_it():
    from diffusers import DDIMScheduler, DDPMScheduler

    scheduler = DDPMScheduler()  # prediction_type left at its default: listed in `_use_default_values`
    assert "prediction_type" in scheduler.config["_use_default_values"]
    config = {**dict(scheduler.config), "prediction_type": "v_prediction"}  # e.g. SD 1.5's, overridden
    assert DDIMScheduler.from_config(config).config.prediction_type == "epsilon"  # the trap
    kept = DDIMScheduler.from_config(compat_diffusers.explicit_config(config))
    assert kept.config.prediction_type == "v_prediction"


def test_a_datasets_fingerprint_names_its_content():
    from datasets import Dataset

    one, same, other = (Dataset.from_dict({"x": values}) for values in ([1, 2], [1, 2], [1, 3]))
    assert compat_datasets.dataset_fingerprint(one) == compat_datasets.dataset_fingerprint(same)
    assert compat_datasets.dataset_fingerprint(one) != compat_datasets.dataset_fingerprint(other)


def test_omegaconf_children_are_read_without_resolving_them():
    cfg = OmegaConf.create(
        {"a": {"x": "${oc.env:NO_SUCH_VARIABLE_HERE}"}, "missing": "???", "none": None, "leaf": 1}
    )
    assert compat_omegaconf.child_config(cfg, "a") is not None  # its interpolation is left alone
    assert compat_omegaconf.child_config(cfg, "missing") is None
    assert compat_omegaconf.child_config(cfg, "none") is None
    assert compat_omegaconf.child_config(cfg, "leaf") is None


def test_hydra_parses_overrides_into_keys_and_kinds():
    plain, added, group = compat_hydra.parse_overrides(
        ["trainer.max_steps=3", "+extra=1", "model/net=unet_tiny"]
    )
    assert (plain.key_or_group, plain.is_add(), plain.input_line) == (
        "trainer.max_steps",
        False,
        "trainer.max_steps=3",
    )
    assert added.is_add() and group.key_or_group == "model/net"


def test_torch_fidelity_resizes_like_tensorflow_and_its_inception_forward_exists():
    from torchmetrics.image.fid import NoTrainInceptionV3

    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    resized = compat_torch_fidelity.resize_like_tensorflow1(images, 16)
    assert resized.shape == (2, 3, 16, 16)
    assert torch.allclose(compat_torch_fidelity.resize_like_tensorflow1(images, 8), images)
    assert callable(getattr(NoTrainInceptionV3, "_torch_fidelity_forward", None))


def test_lightning_saves_the_current_step_on_demand(tmp_path):
    import lightning as L

    from diffusion_lab.callbacks import RunCheckpoint
    from tests.conftest import bare_trainer

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    checkpoint = RunCheckpoint(
        out_dir=str(tmp_path), filename="{step}", every_n_train_steps=100, save_top_k=-1, save_last=True
    )

    class SaveAtTwo(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                compat_lightning.save_checkpoint_now(checkpoint, trainer)
                compat_lightning.save_checkpoint_now(checkpoint, trainer)  # the same step again: skipped

    trainer = bare_trainer(3, enable_checkpointing=True, callbacks=[SaveAtTwo(), checkpoint])
    trainer.fit(Tiny(), train_dataloaders=torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2))
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 3
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step=2.ckpt", "step=3.ckpt"]
