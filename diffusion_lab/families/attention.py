"""Which attention kernel the UNet runs."""

from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

ATTENTION_PROCESSORS = {
    "sdpa": AttnProcessor2_0,  # torch.nn.functional.scaled_dot_product_attention: flash / memory-efficient
    "eager": AttnProcessor,  # softmax(QK^T)V spelled out: the reference, and the memory hog
}


def set_attention(unet, name: str) -> None:
    if name not in ATTENTION_PROCESSORS:
        raise ValueError(f"model.attention={name!r}; choose one of {sorted(ATTENTION_PROCESSORS)}")
    unet.set_attn_processor(ATTENTION_PROCESSORS[name]())
