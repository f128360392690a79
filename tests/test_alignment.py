"""Representation alignment (`model/alignment=sra`): what the term trains, what its teacher sees, where it
stops, and that the projector never leaves the run."""

import functools

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from diffusion_lab.core import DDPM, FlowMatching
from diffusion_lab.core.random import sample_keys
from diffusion_lab.errors import ConfigError
from diffusion_lab.families.checkpoints import read_checkpoint
from diffusion_lab.models import build_unet
from diffusion_lab.models.alignment import SelfRepresentationAlignment, on_grid
from diffusion_lab.networks import build_dit
from tests.test_families import run

SRA = ["model/net=dit", "model.net.size=tiny", "model/alignment=sra", "model.alignment.student_block=2",
       "model.alignment.teacher_block=4", "model.alignment.projector_width=32"]  # fmt: skip


class AverageOf:
    """Stands in for the EMA callback: its average is a given network's weights."""

    def __init__(self, net):
        self.callbacks = [self]
        self.net = net

    def copy_average_to(self, parameters):
        with torch.no_grad():
            for target, source in zip(parameters, self.net.parameters(), strict=True):
                target.copy_(source)


def test_the_term_trains_the_projector_and_the_blocks_up_to_the_student_only():
    torch.manual_seed(0)
    net = build_dit(8, 3, "tiny", 2)
    with torch.no_grad():  # off the zero init, so every block carries a gradient
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    alignment = SelfRepresentationAlignment(net, student_block=2, teacher_block=4, projector_width=16)
    objective, x0, keys = FlowMatching(FlowMatchEulerDiscreteScheduler()), torch.randn(2, 3, 8, 8), [5, 6]
    with alignment.student_tokens(net) as tokens:
        objective.loss(net, x0, keys)  # the objective's own forward, whose block-2 tokens the term uses
    alignment.loss(objective, net, AverageOf(net), {}, x0, keys, tokens[0]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in alignment.projector.parameters())
    assert net.transformer_blocks[1].attn1.to_q.weight.grad.abs().sum() > 0
    assert net.transformer_blocks[2].attn1.to_q.weight.grad is None and net.proj_out_2.weight.grad is None
    (teacher,) = alignment._teacher
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), net.parameters(), strict=True))


@pytest.mark.parametrize(
    "objective", [FlowMatching(FlowMatchEulerDiscreteScheduler()), DDPM(DDPMScheduler())]
)
def test_the_teacher_level_is_less_noisy_by_at_most_the_gap(objective):
    keys = list(range(64))
    times = objective.draw_times(keys, (3, 8, 8), "cpu")
    earlier = objective.earlier_times(times, torch.full((64,), 0.2))
    full_range = 1.0 if objective.kind == "flow" else objective.num_train_timesteps - 1
    assert (earlier <= times).all() and (earlier >= 0).all()
    assert ((times - earlier) <= 0.2 * full_range + 0.5).all()  # (DDPM rounds to whole steps)
    assert (earlier < times).any()


def test_a_training_run_keeps_the_projector_out_of_the_ema_and_the_export_and_stops_at_stop_step(tmp_path):
    run_dir = tmp_path / "run"
    run("train", "debug=fast", "data.image_size=8", *SRA, "model.alignment.stop_step=3", "trainer.max_steps=5",
        f"hydra.run.dir={run_dir}", "callbacks.progress_bar.refresh_rate=0", "trainer.log_every_n_steps=1")  # fmt: skip
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    projector = [key for key in checkpoint["state_dict"] if key.startswith("alignment.projector.")]
    network = [key for key in checkpoint["state_dict"] if key.startswith("net.")]
    assert projector and len(checkpoint["callbacks"]["EMA"]["shadow_params"]) == len(network)
    trained = checkpoint["optimizer_states"][0]["state"]
    assert len(trained) == len(network) + len(projector)  # the optimizer trains both
    exported = load_file(run_dir / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not [key for key in exported if "projector" in key] and len(exported) == len(network)
    header, *rows = (run_dir / "metrics.csv").read_text().splitlines()
    names = header.split(",")
    logged = {}
    for row in rows:
        values = dict(zip(names, row.split(","), strict=True))
        if values["train/align_loss"]:
            logged[int(values["step"])] = float(values["train/align_loss"])
    assert all(logged[step] != 0 for step in (0, 1, 2)) and all(logged[step] == 0 for step in (3, 4))  # HASTE


def test_sra_names_what_it_needs():
    unet = build_unet(
        8, 3, [8, 16], [False, True], layers_per_block=1, norm_num_groups=4, attention_head_dim=4
    )
    with pytest.raises(ConfigError, match="model/net=dit"):
        SelfRepresentationAlignment(unet)
    dit = build_dit(8, 3, "tiny", 2)
    with pytest.raises(ConfigError, match="blocks 1 to 6"):
        SelfRepresentationAlignment(dit, student_block=2, teacher_block=8)
    with pytest.raises(ConfigError, match="must come after"):
        SelfRepresentationAlignment(dit, student_block=4, teacher_block=2)
    alignment = SelfRepresentationAlignment(dit, student_block=2, teacher_block=4, projector_width=8)
    with pytest.raises(ConfigError, match="callbacks.ema"):
        alignment.teacher(dit, trainer=functools.partial(object)())


TINY_ENCODER = ["model.alignment.encoder.name=vit_tiny_patch16_224", "model.alignment.encoder.image_size=32",
                "model.alignment.encoder.pretrained=false", "model.alignment.projector_width=16"]  # fmt: skip


@pytest.mark.parametrize("net", ["dit", "unet_tiny"])
def test_repa_aligns_a_dit_block_or_a_unet_mid_block_to_the_encoders_tokens(compose_config, net):
    pytest.importorskip("timm")
    from hydra.utils import instantiate

    extra = ["model.net.size=tiny", "model.alignment.block=2"] if net == "dit" else []
    cfg = compose_config("debug=fast", "data.image_size=8", f"model/net={net}", *extra, "model/alignment=repa",
                         *TINY_ENCODER)  # fmt: skip
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    alignment, (encoder,) = model.alignment, model.alignment._encoder
    assert not [key for key in model.state_dict() if "encoder" in key]  # rebuilt from its name, not saved
    x0, keys = torch.rand(2, cfg.data.channels, 8, 8) * 2 - 1, [1, 2]  # (digits: one channel)
    with alignment.student_tokens(model.net) as tokens:
        model.objective.loss(model.net, x0, keys)
    term = alignment.loss(model.objective, model.net, None, {"pixels": x0}, x0, keys, tokens[0])
    term.backward()
    assert -1 <= term.item() <= 1
    assert all(p.grad is not None for p in alignment.projector.parameters())
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    student = model.net.transformer_blocks[1] if net == "dit" else model.net.mid_block
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    later = [*model.net.transformer_blocks[2:], model.net.proj_out_2] if net == "dit" else model.net.up_blocks
    assert all(p.grad is None for module in later for p in module.parameters())


def test_encoder_tokens_are_resampled_onto_the_students_grid():
    from diffusion_lab.models.alignment import on_grid

    field = torch.arange(4.0).view(1, 2, 2).expand(1, 2, 2).reshape(1, 4, 1).repeat(1, 1, 3)  # 2 x 2 grid
    resampled = on_grid(field, 16)
    assert resampled.shape == (1, 16, 3)
    assert torch.allclose(resampled.mean(), field.mean()) and torch.equal(on_grid(field, 4), field)
    with pytest.raises(ValueError, match="square"):
        on_grid(field, 8)


def test_repa_without_timm_names_the_extra(monkeypatch):
    import sys

    from diffusion_lab.models.repa import TimmEncoder

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ConfigError, match=r"diffusion_lab\[repa\]"):
        TimmEncoder("vit_tiny_patch16_224", image_size=32, pretrained=False)


@pytest.mark.parametrize(
    "override,named",
    [("compile=true", "compile=true with model.alignment"), ("trainer=fsdp", "with trainer=fsdp")],
)
def test_alignment_with_compile_or_sra_with_fsdp_is_refused_before_training(
    capsys, tmp_path, override, named
):
    from tests.test_renamed import refused

    output = refused(
        capsys, "train", "debug=fast", "data.image_size=8", *SRA, override, f"hydra.run.dir={tmp_path}"
    )
    assert named in output and not list(tmp_path.glob("checkpoints"))


def fake_trainer(datamodule=None, step: int = 0):
    """What the term and the DataModule read of a Trainer, in-process (one CPU rank, training)."""
    from types import SimpleNamespace

    return SimpleNamespace(datamodule=datamodule, global_step=step, training=True, callbacks=[], global_rank=0,
                           world_size=1, strategy=SimpleNamespace(root_device=torch.device("cpu")))  # fmt: skip


def repa_model(compose_config, *overrides):
    from hydra.utils import instantiate

    cfg = compose_config("debug=fast", "data.image_size=8", "model/net=dit", "model.net.size=tiny",
                         "model.alignment.block=2", "model/alignment=repa", *TINY_ENCODER, *overrides)  # fmt: skip
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    model.log = lambda *args, **kwargs: None
    return cfg, model


@pytest.mark.parametrize("weight,stop_step", [(0.0, None), (0.5, 0)])
def test_repa_at_weight_zero_or_past_its_stop_step_is_exactly_the_plain_loss(
    compose_config, weight, stop_step
):
    pytest.importorskip("timm")
    cfg, model = repa_model(compose_config, f"model.alignment.weight={weight}",
                            f"model.alignment.stop_step={stop_step if stop_step is not None else 'null'}")  # fmt: skip
    model.trainer = fake_trainer()
    batch = {"pixels": torch.rand(4, 1, 8, 8) * 2 - 1, "index": torch.arange(4)}
    plain = model.objective.loss(model.net, batch["pixels"], sample_keys(model.noise_seed, 0, batch["index"]))
    assert torch.equal(model.training_step(batch, 0), plain)


def test_repa_scores_minus_its_weight_when_the_projection_is_the_target(compose_config, monkeypatch):
    pytest.importorskip("timm")
    cfg, model = repa_model(compose_config, "model.alignment.weight=0.5")
    model.trainer = fake_trainer()
    batch = {"pixels": torch.rand(4, 1, 8, 8) * 2 - 1, "index": torch.arange(4)}
    targets = 3 * torch.randn(4, 16, model.alignment.projector[-1].out_features)  # any scale: cosine

    class Target(torch.nn.Module):
        def forward(self, tokens):
            return on_grid(targets, tokens.shape[1]) + 0 * tokens.sum()

    monkeypatch.setattr(model.alignment, "targets", lambda batch, device: targets)
    model.alignment.projector = Target()
    plain = model.objective.loss(model.net, batch["pixels"], sample_keys(model.noise_seed, 0, batch["index"]))
    assert torch.allclose(model.training_step(batch, 0) - plain, torch.tensor(-0.5), atol=1e-6)


def test_cached_encoder_features_give_the_live_loss_and_are_built_once_per_key(compose_config, tmp_path):
    pytest.importorskip("timm")
    from hydra.utils import instantiate

    from tests import builders

    builders.write_image_folder(tmp_path / "images", per_class=4)
    data = ["data=imagefolder", f"data.path={tmp_path / 'images'}", "data.val_size=2", "data.batch_size=10",
            "data.num_workers=0", "data.pixel_cache=false", f"model.alignment.cache_dir={tmp_path / 'features'}"]  # fmt: skip
    cfg, model = repa_model(compose_config, *data)
    datamodule = instantiate(cfg.data)
    trainer = fake_trainer(datamodule, step=3)
    model.trainer = datamodule.trainer = trainer
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    assert batch["flipped"].any() and not batch["flipped"].all()  # both orientations are looked up
    keys, alignment = sample_keys(model.noise_seed, 3, batch["index"]), model.alignment

    def term(alignment):
        with alignment.student_tokens(model.net) as tokens:
            model.objective.loss(model.net, batch["pixels"], keys)
        return alignment.loss(model.objective, model.net, trainer, batch, batch["pixels"], keys, tokens[0])

    live, encoded = term(alignment), alignment.targets(batch, torch.device("cpu"))
    alignment.prepare(trainer)
    (folder,) = (tmp_path / "features").iterdir()
    written = (folder / "features.bin").stat().st_mtime_ns
    alignment.setup(trainer)
    assert alignment._cache is not None and torch.allclose(term(alignment), live, atol=1e-6)
    assert torch.allclose(alignment.targets(batch, torch.device("cpu")), encoded, atol=1e-5)
    mirrored = alignment.targets({**batch, "flipped": ~batch["flipped"]}, torch.device("cpu"))
    assert not torch.allclose(mirrored, encoded, atol=1e-3)  # the orientation is the batch's, not any
    alignment.prepare(trainer)  # a rerun reuses it
    assert (folder / "features.bin").stat().st_mtime_ns == written
    _, half = repa_model(compose_config, *data, "model.alignment.storage_dtype=float16")  # stored otherwise:
    half.alignment.prepare(trainer)  # another folder
    assert len(list((tmp_path / "features").iterdir())) == 2
    half.alignment.setup(trainer)
    assert torch.allclose(term(half.alignment), live, atol=1e-3)


def test_a_feature_cache_over_its_budget_or_of_shifting_pixels_is_not_built(compose_config, tmp_path, caplog):
    pytest.importorskip("timm")
    from hydra.utils import instantiate

    from tests import builders

    builders.write_image_folder(tmp_path / "images", per_class=4)
    data = ["data=imagefolder", f"data.path={tmp_path / 'images'}", "data.val_size=2", "data.num_workers=0",
            "data.pixel_cache=false", f"model.alignment.cache_dir={tmp_path / 'features'}"]  # fmt: skip
    caplog.set_level("INFO", logger="diffusion_lab.models.repa")
    for overrides, reason in [(["model.alignment.cache_max_gb=1e-6"], "cache_max_gb"),
                              (["data.center_crop=false"], "random crops")]:  # fmt: skip
        cfg, model = repa_model(compose_config, *data, *overrides)
        trainer = fake_trainer(instantiate(cfg.data))
        model.alignment.prepare(trainer)
        model.alignment.setup(trainer)
        assert model.alignment._cache is None and reason in caplog.text
    assert not (tmp_path / "features").exists()
