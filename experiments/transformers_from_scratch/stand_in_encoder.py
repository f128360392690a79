"""The stand-in for REPA's DINOv2 in this study: a timm ViT-Ti/16 trained here, supervised, on flowers-12's
720 training photos (DINOv2 needs a download; REPA's paper also reports supervised encoders, DeiT among them,
aligning well). It sees what REPA will give it: 32 px images upsampled (bicubic) to 128 px (an 8 x 8 grid of
patch tokens), normalised with timm's own mean and std for the model (what `TimmEncoder` applies). It is scored
on the 240 test photos and saved as a timm state dict without its head, which
`model.alignment.encoder.checkpoint=FILE` loads.

    python experiments/transformers_from_scratch/stand_in_encoder.py DATA_DIR OUT.safetensors [epochs]
"""

import json
import sys
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torchvision import datasets, transforms

NAME, SIZE, DATA_SIZE = "vit_tiny_patch16_224", 128, 32
BICUBIC = transforms.InterpolationMode.BICUBIC


def loaders(root: Path, mean, std):
    normalise, upsample = transforms.Normalize(mean, std), transforms.Resize(SIZE, interpolation=BICUBIC)
    train = datasets.ImageFolder(root / "train", transforms.Compose([
        transforms.RandomResizedCrop(DATA_SIZE, scale=(0.35, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.3, 0.3, 0.3), upsample, transforms.ToTensor(), normalise]))  # fmt: skip
    test = datasets.ImageFolder(root / "test", transforms.Compose([
        transforms.Resize(DATA_SIZE), transforms.CenterCrop(DATA_SIZE), upsample, transforms.ToTensor(),
        normalise]))  # fmt: skip
    return (torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, num_workers=1, drop_last=True),
            torch.utils.data.DataLoader(test, batch_size=120), len(train.classes))  # fmt: skip


@torch.no_grad()
def accuracy(model, loader) -> float:
    model.eval()
    right = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return right / len(loader.dataset)


def main(root: str, out: str, epochs: int = 30) -> None:
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, num_classes=12, img_size=SIZE, drop_path_rate=0.1)
    config = timm.data.resolve_model_data_config(model)
    train, test, classes = loaders(Path(root), config["mean"], config["std"])
    if classes != 12:
        model.reset_classifier(classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, 1e-3, total_steps=epochs * len(train), pct_start=0.1
    )
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for x, y in train:
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
    result = {"encoder": NAME, "image_size": SIZE, "seen_at": DATA_SIZE, "normalisation": [config["mean"], config["std"]], "epochs": epochs, "train_images": len(train.dataset),
              "test_accuracy": accuracy(model, test), "chance": 1 / classes,
              "minutes": (time.perf_counter() - start) / 60}  # fmt: skip
    model.reset_classifier(0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    Path(out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
