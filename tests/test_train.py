"""The dense training recipe: channels-last training learns the same task and hands back a model in the
default memory layout."""

from __future__ import annotations

import timm
import torch

from ptsbench.data import InMemoryImages
from ptsbench.train import train_dense

RECIPE = {"epochs": 3, "batch_size": 16, "lr": 3e-3, "weight_decay": 0.0, "warmup_epochs": 0.0,
          "zero_init_head": True}


def separable_images(n: int = 64) -> InMemoryImages:
    """Two classes told apart by which half of the image is bright."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, 16, 16, generator=g) * 0.1
    labels = torch.arange(n) % 2
    images[labels == 0, :, :8] += 1.0
    images[labels == 1, :, 8:] += 1.0
    return InMemoryImages(images, labels)


def test_channels_last_training_learns_and_returns_contiguous_weights():
    data = separable_images()
    results = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = timm.create_model("resnet18", in_chans=1, num_classes=2)
        info = train_dense(model, data, {**RECIPE, "channels_last": channels_last}, seed=0, progress=False)
        assert info["train_steps"] == 12
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(w.is_contiguous() for w in convs)  # safetensors and strict reloads need the default layout
        model.train()  # batch statistics: 12 steps are too few for the running averages
        with torch.no_grad():
            accuracy = (model(data.images).argmax(1) == data.labels).float().mean().item()
        results[channels_last] = (info["final_train_loss"], accuracy)
    for loss, accuracy in results.values():
        assert loss < 0.5 and accuracy == 1.0
    # Same recipe and seed in both layouts: the runs differ only by float summation order.
    assert abs(results[True][0] - results[False][0]) < 0.05
