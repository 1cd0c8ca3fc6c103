"""The harness's own dense training recipe, used when no checkpoint or hub weights are given.

Short AdamW runs with a per-iteration cosine schedule, label smoothing and light augmentation (random
translation, horizontal flip), applied batch-wise on in-memory tensors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm.auto import tqdm

from ptsbench.data import InMemoryImages, iterate_batches
from ptsbench.errors import ConfigError, ensure_finite
from ptsbench.evaluate import is_convolutional
from ptsbench.streams import stream_seed

log = logging.getLogger(__name__)


def random_translate_flip(images: torch.Tensor, max_shift: int, flip: bool,
                          generator: torch.Generator) -> torch.Tensor:
    """Per-image integer shifts in [-max_shift, max_shift] (zero fill) and optional horizontal flips."""
    n, c, h, w = images.shape
    if max_shift > 0:
        s = max_shift
        padded = F.pad(images, (s, s, s, s))
        dy = torch.randint(0, 2 * s + 1, (n, 1), generator=generator)
        dx = torch.randint(0, 2 * s + 1, (n, 1), generator=generator)
        rows = (dy + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * s)
        cols = (dx + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
        images = padded.gather(2, rows).gather(3, cols)
    if flip:
        flip_mask = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flip_mask.view(n, 1, 1, 1), images.flip(3), images)
    return images


def zero_classifier(model: nn.Module) -> None:
    """Zero the classifier. timm's Google-style init scales the head by 1/sqrt(num_classes), which for 10
    classes starts MobileNetV2 at logits near 20 and a loss near 8, and short runs never recover."""
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


def train_dense(model: nn.Module, train_set: InMemoryImages, recipe: Mapping, seed: int,
                device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """Train `model` in place with the recipe; returns timing and the last epoch's mean loss."""
    if not isinstance(train_set, InMemoryImages):
        raise ConfigError(
            "The built-in dense training recipe runs on in-memory datasets (fashion_mnist, cifar10). "
            "For ImageNet-style folders pass trained weights with model.checkpoint=PATH or "
            "model.pretrained=true."
        )
    epochs, batch_size = float(recipe["epochs"]), int(recipe["batch_size"])
    steps_per_epoch = len(train_set) // batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size={batch_size} is larger than the train split ({len(train_set)} "
                          "images).")
    g = torch.Generator().manual_seed(stream_seed("dense.train", seed))
    torch.manual_seed(stream_seed("dense.train.torch", seed))
    if recipe.get("zero_init_head", False):
        zero_classifier(model)
    # NHWC pays off for CNNs only; a ViT's one convolution (the patch embedding) gains nothing from it.
    nhwc = bool(recipe.get("channels_last", False)) and is_convolutional(model)
    memory_format = torch.channels_last if nhwc else torch.contiguous_format
    model.to(device, memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(recipe["lr"]),
                                  weight_decay=float(recipe["weight_decay"]))
    total = max(1, round(epochs * steps_per_epoch))
    warmup_steps = int(round(float(recipe.get("warmup_epochs", 0)) * steps_per_epoch))
    scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=float(recipe.get("min_lr", 0.0)),
                                  warmup_t=warmup_steps,
                                  warmup_lr_init=float(recipe.get("warmup_lr", 1e-6)), t_in_epochs=False)
    smoothing = float(recipe.get("label_smoothing", 0.0))
    max_shift, flip = int(recipe.get("max_shift", 0)), bool(recipe.get("hflip", False))
    start = time.perf_counter()
    step, epoch_loss = 0, float("nan")
    bar = tqdm(total=total, desc=f"dense training ({epochs:g} ep)", disable=not progress, leave=False,
               mininterval=1.0)
    while step < total:
        running, seen = 0.0, 0
        for images, labels in iterate_batches(train_set, batch_size, shuffle=True, generator=g,
                                              drop_last=True):
            images = random_translate_flip(images, max_shift, flip, g).to(device, memory_format=memory_format)
            labels = labels.to(device)
            loss = F.cross_entropy(model(images), labels, label_smoothing=smoothing)
            value = ensure_finite(loss.item(), "Dense training loss (lower train.lr)", step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            running += value * len(labels)
            seen += len(labels)
            bar.update(1)
            bar.set_postfix(loss=f"{running / seen:.3f}", refresh=False)
            if step >= total:
                break
        epoch_loss = running / max(seen, 1)
    bar.close()
    model.to(memory_format=torch.contiguous_format).eval()
    return {"train_seconds": time.perf_counter() - start, "train_steps": step, "final_train_loss": epoch_loss}
