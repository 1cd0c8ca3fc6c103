"""The calibration stream FCPTS trains on: reshuffled epochs of full batches, optionally augmented.

The released code feeds its 1,024 calibration images through the `weak` preset of its training loader,
RandomResizedCrop(224) (torchvision defaults: scale (0.08, 1), ratio (3/4, 4/3), bilinear) followed by
a horizontal flip with probability 0.5, redrawn every epoch: 1,600 iterations are 100 epochs of new
views of the same images, not 100 passes over identical tensors. The harness holds the calibration
set as normalised in-memory tensors, so the same transform runs here on whole batches: one affine
sampling grid per image (crop, resize and flip in one `grid_sample`). Bilinear interpolation commutes
with the per-channel normalisation, so augmenting normalised tensors equals augmenting the pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ptsbench.data import CalibrationSet

CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults, as the reference's `weak` preset uses
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10  # torchvision draws up to 10 boxes before falling back to a central crop
FLIP_PROBABILITY = 0.5


def random_crop_boxes(n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) boxes (top, left, h, w) in pixels, drawn as torchvision's RandomResizedCrop.get_params
    draws them, for n images at once: the first of 10 attempts that fits, else the central crop."""
    area = height * width
    scale = torch.empty(n, CROP_ATTEMPTS, dtype=torch.float64).uniform_(*CROP_SCALE, generator=generator)
    log_ratio = torch.empty(n, CROP_ATTEMPTS, dtype=torch.float64).uniform_(
        math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=generator)
    aspect = log_ratio.exp()
    w = torch.round(torch.sqrt(area * scale * aspect))
    h = torch.round(torch.sqrt(area * scale / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.double().argmax(dim=1, keepdim=True)  # the first attempt that fits (0 if none does)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    fallback_h, fallback_w = central_crop_size(height, width)
    found = fits.any(dim=1)
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    top = torch.where(found, torch.floor(u[:, 0] * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(u[:, 1] * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.stack([top, left, h, w], dim=1)


def central_crop_size(height: int, width: int) -> tuple[int, int]:
    """torchvision's fallback box: the whole image, clipped to the allowed aspect ratios."""
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        return round(width / CROP_RATIO[0]), width
    if in_ratio > CROP_RATIO[1]:
        return height, round(height * CROP_RATIO[1])
    return height, width


def resized_crop_flip(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop each image to its box, resize it back to the input size and mirror it where `flip` is true,
    in one grid_sample: the same pixels as cropping, then F.interpolate (bilinear, align_corners=False,
    which is what torchvision's tensor resize does when it enlarges, and a crop is never larger than the
    image), then flipping.

    Output pixel centres map into the box; near its edges they may fall up to half a pixel outside, where
    interpolate clamps the source position to the crop's edge pixels. The grid is clamped the same way.
    """
    n, c, height, width = images.shape
    top, left, h, w = boxes.to(device=images.device, dtype=images.dtype).unbind(1)
    flip = flip.to(images.device)
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = torch.where(flip, -w / width, w / width)
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, c, height, width], align_corners=False)
    # normalised coordinates of the first and last pixel centres inside each box
    lo = torch.stack([(2 * left + 1) / width - 1, (2 * top + 1) / height - 1], dim=1).view(n, 1, 1, 2)
    hi = torch.stack([(2 * (left + w) - 1) / width - 1, (2 * (top + h) - 1) / height - 1],
                     dim=1).view(n, 1, 1, 2)
    grid = torch.maximum(torch.minimum(grid, hi), lo)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The reference's `weak` augmentation on a batch of (N, C, H, W) tensors, output at the input size."""
    n, _, height, width = images.shape
    boxes = random_crop_boxes(n, height, width, generator)
    flip = torch.rand(n, generator=generator) < FLIP_PROBABILITY
    return resized_crop_flip(images, boxes, flip)


def calibration_stream(calib: CalibrationSet, batch_size: int, device: torch.device,
                       order: torch.Generator, augment: torch.Generator | None = None
                       ) -> Iterator[torch.Tensor]:
    """Endless epochs of reshuffled, full calibration batches (drop_last, as the reference loader), each
    batch augmented with `augment`'s random stream when it is given."""
    while True:
        for images, _ in calib.batches(batch_size, shuffle=True, generator=order, drop_last=True):
            images = images.to(device, non_blocking=True)
            yield images if augment is None else random_resized_crop_flip(images, augment)
