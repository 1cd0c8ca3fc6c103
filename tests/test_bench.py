"""Benchmarks that print figures (`bash scripts/test.sh -m bench -s`); excluded from the default run.

Evaluation throughput of the harness against a plain `model(x)` loop over the same tensors.
"""

from __future__ import annotations

import time

import pytest
import timm
import torch
from omegaconf import OmegaConf

from ptsbench.data import build_data, iterate_batches
from ptsbench.evaluate import evaluate


def plain_loop(model, images, batch_size):
    correct = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            correct += int(model(images[i:i + batch_size]).argmax(1).eq(torch.zeros(1)).sum())
    return len(images) / (time.perf_counter() - start)


@pytest.mark.bench
@pytest.mark.parametrize("name,kwargs", [
    ("resnet18", {}),
    ("mobilenetv2_100", {}),
    ("vit_tiny_patch16_224", {"img_size": 28, "patch_size": 7}),
])
def test_eval_throughput_against_plain_loop(require_fmnist, tmp_path, name, kwargs):
    data = build_data(OmegaConf.create({"name": "fashion_mnist", "root": str(require_fmnist)}), tmp_path)
    model = timm.create_model(name, num_classes=10, in_chans=1, **kwargs).eval()
    images = data.test.images
    batch = 500
    evaluate(model, data.test, batch_size=batch)  # warm-up
    plain = max(plain_loop(model, images, batch) for _ in range(2))
    harness = max(evaluate(model, data.test, batch_size=batch).images_per_second for _ in range(2))
    harness_cl = max(evaluate(model, data.test, batch_size=batch, channels_last=True).images_per_second
                     for _ in range(2))
    print(f"\n{name}: plain model(x) {plain:.0f} img/s; harness {harness:.0f} img/s (ratio {harness / plain:.3f}); "
          f"harness channels_last {harness_cl:.0f} img/s (ratio {harness_cl / plain:.3f})")
    assert harness / plain > 0.8
    assert sum(1 for _ in iterate_batches(data.test, batch)) == 20
