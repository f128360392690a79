"""DiT / SiT backbones: diffusers' `DiTTransformer2DModel` as a drop-in for the pixel UNet.

DiT (Peebles & Xie 2023, arXiv:2212.09748) is a ViT on patches with adaLN-Zero conditioning; SiT (Ma et al.
2024, arXiv:2401.08740) is the same network trained with flow matching (`model/objective=flow_matching`). The
blocks, attention and patch embedding are diffusers'; this module adds what training from scratch needs and
the stock class lacks:

- the paper's initialisation (diffusers loads ported weights and initialises nothing): xavier-uniform linears,
  the patch projection as a linear, N(0, 0.02) label and timestep embeddings, and zero adaLN modulation and
  output layers, so every block starts as the identity;
- an unconditional mode (`num_class_embeds=None`: one label, always 0), with the UNet's name for the class
  count, so samplers, grids and exports treat both networks alike;
- one timestep per image or one for the batch (the samplers pass a scalar, as to `UNet2DModel`);
- learned position embeddings as an option (`position_embedding=learned`, initialised at the sin-cos values).
"""

import inspect

import torch
from diffusers import DiTTransformer2DModel, ModelMixin  # noqa: F401
from diffusers.configuration_utils import FrozenDict, register_to_config
from torch import nn

# (layers, width, heads) of the paper's sizes (DiT Table 1); "tiny" is DeiT-Ti's width and heads at half its
# depth: a transformer that trains on 2 CPU cores.
DIT_SIZES = {
    "tiny": (6, 192, 3),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
POSITION_EMBEDDINGS = ("sincos", "learned")
# A folder naming this module (`"transformer": ["diffusion_lab.networks.dit", "DiffusionTransformer"]`, a DiT with
# learned position embeddings) loads in diffusers' `from_pretrained`, which looks the class up here and finds its
# loading method by the module's `ModelMixin` (imported above for that).


class DiffusionTransformer(DiTTransformer2DModel):
    """`DiTTransformer2DModel` with `num_class_embeds` (None: unconditional) and `position_embedding`."""

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        sample_size: int = 32,
        patch_size: int = 2,
        num_class_embeds: int | None = None,
        position_embedding: str = "sincos",
    ) -> None:
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding={position_embedding!r}: choose one of {POSITION_EMBEDDINGS}"
            )
        super().__init__(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, num_layers=num_layers, dropout=dropout,
            sample_size=sample_size, patch_size=patch_size, num_embeds_ada_norm=num_class_embeds or 1,
        )  # fmt: skip
        # The stock class registered its own arguments; this class's config is its own (no unused keys).
        self._internal_dict = FrozenDict(
            {key: value for key, value in self._internal_dict.items() if key in _OWN_KEYS}
        )
        for block in self.transformer_blocks:  # label dropout is the DataModule's, keyed like the noise
            block.norm1.emb.class_embedder.dropout_prob = 0.0
        if position_embedding == "learned":
            fixed = self.pos_embed.pos_embed
            del self.pos_embed._buffers["pos_embed"]
            self.pos_embed.pos_embed = nn.Parameter(fixed.clone())
        initialize(self)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None, **kwargs):
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if class_labels is None:
            if self.config.num_class_embeds:
                raise ValueError("this DiT is class-conditional: pass class_labels")
            class_labels = torch.zeros(batch, dtype=torch.long, device=sample.device)
        return super().forward(sample, timestep=timestep, class_labels=class_labels, **kwargs)


_OWN_KEYS = set(inspect.signature(DiffusionTransformer.__init__).parameters) - {"self"}


@torch.no_grad()
def initialize(net: DiTTransformer2DModel) -> None:
    """DiT's initialisation (arXiv:2212.09748 section 3; the public DiT code's `initialize_weights`)."""
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    projection = net.pos_embed.proj
    nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
    nn.init.zeros_(projection.bias)
    for block in net.transformer_blocks:
        embedding = block.norm1.emb
        nn.init.normal_(embedding.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(embedding.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedding.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)  # adaLN-Zero: each block starts as the identity
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (net.proj_out_1, net.proj_out_2):  # and the output starts at zero
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def build_dit(
    sample_size: int,
    in_channels: int,
    size: str = "S",
    patch_size: int = 2,
    num_class_embeds: int | None = None,
    position_embedding: str = "sincos",
    dropout: float = 0.0,
) -> DiffusionTransformer:
    """A DiT of a named size (tiny / S / B / L / XL) with patch size p, checked before anything trains."""
    if size not in DIT_SIZES:
        raise ValueError(f"model.net.size={size!r}: choose one of {', '.join(DIT_SIZES)}")
    if sample_size % patch_size:
        raise ValueError(
            f"image size {sample_size} is not divisible by model.net.patch_size={patch_size}: "
            f"use a patch size that divides it, e.g. {[p for p in (1, 2, 4, 8) if sample_size % p == 0]}"
        )
    layers, width, heads = DIT_SIZES[size]
    return DiffusionTransformer(
        num_attention_heads=heads, attention_head_dim=width // heads, in_channels=in_channels,
        num_layers=layers, dropout=dropout, sample_size=sample_size, patch_size=patch_size,
        num_class_embeds=num_class_embeds, position_embedding=position_embedding,
    )  # fmt: skip


def to_stock(net: DiffusionTransformer) -> DiTTransformer2DModel:
    """The same network as diffusers' own class, which any diffusers loads (sin-cos position embeddings: the
    stock class recomputes them and saves none). A net with learned ones is returned as it is: its folder then
    names `diffusion_lab.DiffusionTransformer`, which loads where diffusion_lab is installed."""
    if net.config.position_embedding == "learned":
        return net
    config = {key: value for key, value in net.config.items() if key in _OWN_KEYS}
    config["num_embeds_ada_norm"] = config.pop("num_class_embeds") or 1
    config["out_channels"] = config["out_channels"] or config["in_channels"]  # DiTPipeline reads it
    del config["position_embedding"]
    stock = DiTTransformer2DModel.from_config(config)
    stock.load_state_dict(net.state_dict())
    if net.dtype != stock.dtype:
        stock.to(dtype=net.dtype)
    return stock


def from_stock(model: DiTTransformer2DModel) -> DiffusionTransformer:
    """A stock `DiTTransformer2DModel` (an exported folder's) as this package's class, weights and all."""
    if isinstance(model, DiffusionTransformer):
        return model
    config = model.config
    classes = config.num_embeds_ada_norm
    net = DiffusionTransformer(
        num_attention_heads=config.num_attention_heads, attention_head_dim=config.attention_head_dim,
        in_channels=config.in_channels, num_layers=config.num_layers,
        out_channels=None if config.out_channels == config.in_channels else config.out_channels,
        dropout=config.dropout, sample_size=config.sample_size, patch_size=config.patch_size,
        num_class_embeds=classes if classes > 1 else None,
    )  # fmt: skip
    net.load_state_dict(model.state_dict())
    if model.dtype != net.dtype:
        net.to(dtype=model.dtype)
    return net.train(model.training)
