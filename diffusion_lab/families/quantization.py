"""The frozen base network stored in fewer bits, with LoRA trained on top (QLoRA, Dettmers et al. 2023,
arXiv:2305.14314): what fits Flux's 12 B parameters on a 24 GB card.

`model.quantize` names the format; the base is quantised as `from_pretrained` loads it (diffusers'
`quantization_config`), and its non-quantised parts (norms, embeddings) and the computation run in bfloat16:

- `nf4`: bitsandbytes 4-bit NormalFloat with double quantisation, 0.5 byte a weight (the diffusers "flux-qlora"
  write-up; kohya `--fp8_base` is the 8-bit cousin). CUDA only.
- `int8`: torchao int8 weight-only, 1 byte a weight (ai-toolkit's `quantize: true` on Flux is 8-bit). Runs on a
  CPU too, so the tiny experiments and tests take the same path.

Both are optional dependencies: `pip install 'diffusion-lab[quant]'`. Without quantisation, `model.base_dtype=bfloat16`
keeps a LoRA run's frozen base in bf16 (half of fp32's bytes; diffusers' LoRA scripts load it in the training
dtype): Flux's 11.9 B parameters are 23.8 GB instead of 47.6. The adapters train in float32 either way.
"""

import torch

from diffusion_lab.errors import ConfigError

FORMATS = {
    "nf4": "bitsandbytes 4-bit NF4 (CUDA)",
    "int8": "torchao int8 weight-only",
}
COMPUTE_DTYPE = torch.bfloat16


def check_base_storage(quantize: str | None, base_dtype: str | None, lora_rank: int | None) -> None:
    """A known format, and LoRA: quantised or half-precision weights are not trained (a step on bf16 weights
    rounds small updates away; quantised ones have none)."""
    if base_dtype is not None:
        if base_dtype not in ("bfloat16", "float16"):
            raise ConfigError(
                f"model.base_dtype={base_dtype!r}; choose bfloat16, float16 or null (as loaded, fp32)"
            )
        if lora_rank is None:
            raise ConfigError(
                f"model.base_dtype={base_dtype} stores the frozen base of a LoRA run: set model.lora_rank (a full "
                "fine-tune keeps fp32 weights; trainer.precision=bf16-mixed computes in bf16)"
            )
        if quantize is not None:
            raise ConfigError("model.quantize computes in bfloat16 already: leave model.base_dtype null")
    if quantize is None:
        return
    if quantize not in FORMATS:
        raise ConfigError(
            f"model.quantize={quantize!r}; choose one of {', '.join(f'{k} ({v})' for k, v in FORMATS.items())}, or null"
        )
    if lora_rank is None:
        raise ConfigError(
            f"model.quantize={quantize} trains LoRA adapters on a frozen quantised base: set model.lora_rank "
            "(a full fine-tune needs the weights in bf16 or fp32)"
        )


def base_loading(quantize: str | None, base_dtype: str | None) -> dict:
    """`from_pretrained` keyword arguments for the trainable network's frozen base."""
    if quantize:
        return {"quantization_config": quantization_config(quantize), "torch_dtype": COMPUTE_DTYPE}
    if base_dtype:
        return {"torch_dtype": getattr(torch, base_dtype)}
    return {}


def quantization_config(quantize: str):
    """diffusers' `quantization_config` for `from_pretrained`, or an error naming the package to install."""
    if quantize == "nf4":
        if not torch.cuda.is_available():
            raise ConfigError(
                "model.quantize=nf4 needs a CUDA GPU (bitsandbytes' 4-bit kernels); on a CPU use int8"
            )
        _require("bitsandbytes")
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=COMPUTE_DTYPE)  # fmt: skip
    _require("torchao")
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _require(package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"model.quantize needs {package}: pip install 'diffusion-lab[quant]'")
