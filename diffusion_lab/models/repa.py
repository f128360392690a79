"""REPA (Yu et al. 2024, arXiv:2410.06940): a DiT block's tokens (REPA: block 8 of SiT-XL/2), or a UNet's
mid-block (U-REPA, arXiv:2503.18414), through a projector, aligned to a frozen pretrained encoder's patch tokens of
the clean image (DINOv2 ViT-B/14 by default, named by a timm model id), resampled onto the network's token grid.

On local data whose training pixels are fixed up to flips, the encoder's tokens are computed once per image and
orientation before training (`data.feature_cache`), so the encoder costs nothing per step.
"""

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.data.bucket_batching import batches_by_shape
from diffusion_lab.data.feature_cache import (
    CACHE_FORMAT,
    CachedFeatures,
    feature_cache_folder,
    write_feature_cache,
)
from diffusion_lab.data.identity import data_identity
from diffusion_lab.data.latent_cache import storage_dtype
from diffusion_lab.errors import ConfigError
from diffusion_lab.models.alignment import (
    AlignmentTerm,
    as_tokens,
    negative_cosine,
    on_grid,
    projector,
    transformer_block,
)

log = logging.getLogger(__name__)


class TimmEncoder(nn.Module):
    """A frozen timm vision transformer's patch tokens of images in [-1, 1], resized (bicubic) to `image_size` and
    normalised with the encoder's own mean and std. `pretrained` loads the hub weights (DINOv2 for REPA's
    default) or, with `checkpoint`, a local file of them (e.g. a stand-in encoder trained here)."""

    def __init__(
        self,
        name: str = "vit_base_patch14_dinov2.lvd142m",
        image_size: int = 224,
        pretrained: bool = True,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as error:
            raise ConfigError(
                f"model/alignment=repa reads its encoder with timm: pip install 'diffusion_lab[repa]' ({error})"
            ) from None
        overlay = {"file": str(Path(checkpoint).expanduser())} if checkpoint else None
        self.model = timm.create_model(name, pretrained=pretrained or bool(checkpoint), num_classes=0,
                                       img_size=image_size, pretrained_cfg_overlay=overlay)  # fmt: skip
        self.model.eval().requires_grad_(False)
        config = timm.data.resolve_model_data_config(self.model)
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), persistent=False)
        self.name, self.image_size = name, image_size
        self._key: dict | None = None

    @property
    def width(self) -> int:
        return self.model.embed_dim

    @property
    def num_tokens(self) -> int:
        return self.model.patch_embed.num_patches

    def key(self) -> dict:
        """What its tokens depend on: the model id, the input size and the weights themselves (a digest: a
        checkpoint rewritten in place, or another random initialisation, is another encoder)."""
        if self._key is None:
            digest = hashlib.sha256()
            for name, tensor in self.model.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._key = {"name": self.name, "image_size": self.image_size, "weights": digest.hexdigest()}
        return self._key

    def train(self, mode: bool = True) -> "TimmEncoder":
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        tokens = self.model.forward_features((x.clamp(0, 1) - self.mean) / self.std)
        return tokens[:, self.model.num_prefix_tokens :]


class RepresentationAlignment(AlignmentTerm):
    """REPA: block `block` of a DiT (or a UNet's mid-block: U-REPA), through the projector, aligned to a frozen
    encoder's patch tokens of the batch's clean images (`pixels`: for a latent model too, the encoder sees the
    images). The encoder is held outside the module's state (not checkpointed: it is rebuilt from its name).

    With `cache_dir`, data whose training pixels are fixed up to flips (the DataModule's `cache_refusal` says
    None) has its features computed before training, once per image and orientation, where they fit in
    `cache_max_gb`; other data is encoded live, every step (the reason is logged)."""

    def __init__(
        self,
        net: nn.Module,
        encoder: nn.Module,
        weight: float = 0.5,
        block: int = 8,
        projector_width: int = 2048,
        stop_step: int | None = None,
        cache_dir: str | None = None,
        cache_max_gb: float = 50.0,
        storage_dtype: str = "float32",
    ) -> None:
        super().__init__(weight, stop_step)
        self.block = block
        if hasattr(net, "transformer_blocks"):
            transformer_block(net, block, "model.alignment.block")
            width = net.config.num_attention_heads * net.config.attention_head_dim
        elif getattr(net, "mid_block", None) is not None:  # U-REPA
            width = net.config.block_out_channels[-1]
        else:
            raise ConfigError(
                f"model/alignment=repa aligns a DiT block or a UNet mid-block; {type(net).__name__} has neither"
            )
        self._encoder = [encoder.eval().requires_grad_(False)]  # a list: not a submodule, not checkpointed
        self.projector = projector(width, projector_width, encoder.width)
        if storage_dtype not in ("float32", "float16"):
            raise ConfigError(f"model.alignment.storage_dtype={storage_dtype!r}: choose float32 or float16")
        self.cache_dir, self.cache_max_gb, self.storage_dtype = cache_dir, cache_max_gb, storage_dtype
        self._cache: CachedFeatures | None = None
        self._folder: tuple | None = None  # (data module, its cache folder or None, why not)

    def student(self, net: nn.Module) -> nn.Module:
        if hasattr(net, "transformer_blocks"):
            return transformer_block(net, self.block, "model.alignment.block")
        return net.mid_block

    # ---- the feature cache --------------------------------------------------------------------------------
    def cache_folder(self, trainer) -> tuple[object, Path | None]:
        """(the image DataModule, the folder its features are cached in), or (…, None) to encode live; worked out
        once (the key stats every file) and the reason for live encoding logged."""
        datamodule = getattr(trainer, "datamodule", None)
        images = getattr(datamodule, "images", datamodule)  # a latent cache's images
        if self._folder is None or self._folder[0] is not images:
            folder, reason, key = None, None, None
            refusal = getattr(images, "cache_refusal", None)
            if self.cache_dir is None:
                reason = "model.alignment.cache_dir is null"
            elif refusal is None:
                reason = f"{type(images).__name__} keeps no per-image listing to key a cache by"
            else:
                reason = refusal("train")
            if reason is None:
                encoder = self._encoder[0]
                size = (images.num_examples("train") * (2 if images.hparams.random_flip else 1) * encoder.num_tokens
                        * encoder.width * storage_dtype(self.storage_dtype).itemsize)  # fmt: skip
                if size > self.cache_max_gb * 2**30:
                    reason = f"~{size / 2**30:.1f} GB > model.alignment.cache_max_gb={self.cache_max_gb}"
            if reason is None:
                key = {"format": CACHE_FORMAT, "encoder": self._encoder[0].key(), "data": data_identity(images),
                       "content": images.content_key("train"), "storage_dtype": self.storage_dtype}  # fmt: skip
                folder = feature_cache_folder(self.cache_dir, key)
            else:
                log.info("REPA encodes its targets live every step: %s", reason)
            self._folder = (images, folder, key)
        return self._folder[0], self._folder[1]

    def prepare(self, trainer) -> None:
        images, folder = self.cache_folder(trainer)
        if folder is None:
            return
        if (folder / "meta.json").exists():
            log.info("REPA features: reusing %s", folder)
            return
        examples, flips = images.examples_for_cache("train")
        device = trainer.strategy.root_device
        encoder = self._encoder[0].to(device)
        write_feature_cache(folder, batches_by_shape(examples, 32), encoder, flips=flips, key=self._folder[2],
                            device=device, dtype=self.storage_dtype)  # fmt: skip
        encoder.to("cpu")  # the cache serves training now
        log.info("REPA features: wrote %s", folder)

    def setup(self, trainer) -> None:
        _, folder = self.cache_folder(trainer)
        if folder is None:
            return
        if not (folder / "meta.json").exists():
            raise FileNotFoundError(
                f"no REPA feature cache at {folder}: the LightningModule's prepare_data builds it (on local rank "
                "0 of each node: the cache_dir must be on a disk every rank of the node sees)"
            )
        self._cache = CachedFeatures(folder)

    # ---- the term -------------------------------------------------------------------------------------
    def targets(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The encoder's tokens of the batch's images: from the cache where there is one, else live."""
        if self._cache is not None:
            return self._cache(batch["index"], batch.get("flipped"), device)
        if "pixels" not in batch:
            raise ConfigError(
                "model/alignment=repa needs the images: a latent-cached run keeps no pixels, and the encoder's "
                "features are cached only for local data with centre crops (model.alignment.cache_dir)"
            )
        return self._encoder[0].to(device)(batch["pixels"])

    def loss(self, objective, net, trainer, batch: dict, x0: torch.Tensor, keys: list[int], tokens,
             **net_kwargs) -> torch.Tensor:  # fmt: skip
        """The REPA term for a batch whose student block output is `tokens`."""
        tokens = as_tokens(tokens)
        targets = on_grid(self.targets(batch, x0.device), tokens.shape[1])
        return negative_cosine(self.projector(tokens), targets)
