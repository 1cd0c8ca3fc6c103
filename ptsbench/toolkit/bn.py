"""BatchNorm re-estimation on calibration data: pruning shifts activations, so running statistics
measured on the dense network no longer fit the sparse one."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ptsbench.data import CalibrationSet


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, calib: CalibrationSet, device: torch.device | str = "cpu",
                          batch_size: int = 64, noise_std: float = 0.0,
                          generator: torch.Generator | None = None) -> int:
    """Reset BN running statistics and re-estimate them as exact averages over the calibration set.

    `noise_std` adds Gaussian noise to the inputs (UniPTS's fitness regulariser). Returns the number of
    BN layers updated; the model's mode and the layers' momenta are restored.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    for images, _ in calib.batches(batch_size):
        images = images.to(device, non_blocking=True)
        if noise_std > 0:
            noise = torch.randn(images.shape, generator=generator, device="cpu").to(images.device)
            images = images + noise_std * noise
        model(images)
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)
    return len(layers)
