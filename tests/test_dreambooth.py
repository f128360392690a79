"""DreamBooth end to end (issue 25): the tiny recipe with each lever trains, resumes exactly, and runs on two DDP
ranks as on one process; the data module reads an instance folder with caption files."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.data.digits import ensure_digit_instances
from diffusion_lab.data.dreambooth import instance_rows
from diffusion_lab.errors import ConfigError
from tests.test_families import run


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """Eight handwritten 3s, a left-half mask for each, and the cache folder the runs share."""
    root = tmp_path_factory.mktemp("dreambooth")
    pictures = ensure_digit_instances(str(root / "pictures"), digit=3, count=8, image_size=32)
    (root / "masks").mkdir()
    for path in sorted(root.joinpath("pictures").glob("*.png")):
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[:, :16] = 255
        Image.fromarray(mask, "L").save(root / "masks" / path.name)
    return root, pictures


LEVERS = {
    "output": ["model/preservation=output"],
    "prior": [
        "model/preservation=prior",
        "model.preservation.num_class_images=4",
        "model.preservation.num_inference_steps=2",
    ],  # fmt: skip
    "masked": ["model/preservation=none", "model/loss_mask=masked", "model.loss_mask.unmasked_weight=0.1"],
}


def _common(subject, tmp_path, lever: str) -> list[str]:
    root, pictures = subject
    masks = [f"data.mask_dir={root / 'masks'}"] if lever == "masked" else []
    return ["experiment=dreambooth_lora_tiny", *LEVERS[lever], *masks, f"data.instance_dir={pictures}",
            f"paths.cache_dir={root / 'cache'}", "callbacks.progress_bar.refresh_rate=0",
            "trainer.enable_model_summary=false", "val_every_n_steps=100", "callbacks.prompt_grid.every_n_steps=100",
            "callbacks.prompt_grid.num_inference_steps=2", "callbacks.prompt_grid.seeds=[0]"]  # fmt: skip


def _weights(folder) -> dict:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_each_lever_resumes_exactly(lever, subject, tmp_path):
    common = [*_common(subject, tmp_path, lever), "callbacks.model_checkpoint.every_n_train_steps=2"]
    run("train", *common, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'straight'}")
    half = tmp_path / "straight" / "checkpoints" / "step_0000002.ckpt"
    run("train", *common, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'resumed'}", f"ckpt_path={half}")
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight["global_step"] == resumed["global_step"] == 4
    assert straight["state_dict"] and all("lora_" in key for key in straight["state_dict"])
    for name, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("lever", ["prior", "output"])
def test_ddp_on_two_cpu_processes_equals_one_process(lever, subject, tmp_path):
    """Two ranks of two pictures each end on the weights of one process with four (masks on the prior run too)."""
    from tests.test_commands import cli

    common = [*_common(subject, tmp_path, lever), "trainer.max_steps=3",
              "callbacks.model_checkpoint.every_n_train_steps=3"]  # fmt: skip
    if lever == "prior":
        common += ["model/loss_mask=masked", f"data.mask_dir={subject[0] / 'masks'}"]
    run("train", *common, "trainer=cpu", "data.batch_size=4", f"hydra.run.dir={tmp_path / 'one'}")
    cli("train", *common, "trainer=ddp_cpu", "data.batch_size=2", f"hydra.run.dir={tmp_path / 'two'}")
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert two["global_step"] == one["global_step"] == 3
    for name, value in two["state_dict"].items():
        torch.testing.assert_close(value, one["state_dict"][name], atol=2e-5, rtol=1e-4, msg=name)


def test_an_instance_folder_is_captioned_by_caption_files_or_the_instance_prompt(tmp_path):
    for name in ("a.jpg", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "b.txt").write_text("a photo of sks dog on a sofa\n")
    (tmp_path / "notes.md").write_text("not a picture")
    rows = instance_rows(str(tmp_path), "a photo of sks dog")
    assert [r.rsplit("/", 1)[-1] for r in rows["image"]] == ["a.jpg", "b.png", "c.png"]
    assert rows["caption"] == ["a photo of sks dog", "a photo of sks dog on a sofa", "a photo of sks dog"]
    with pytest.raises(ConfigError, match="no such folder"):
        instance_rows(str(tmp_path / "missing"), "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        instance_rows(str(tmp_path / "empty"), "x")
