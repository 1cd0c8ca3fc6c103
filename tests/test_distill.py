"""Distillation losses against their formulas, and block discovery from module structure."""

from __future__ import annotations

import math

import timm
import torch

from ptsbench.toolkit.distill import (
    BlockOutputs,
    base_decayed_kl,
    block_mse,
    find_blocks,
    kd_kl,
    tau_schedule,
)

STUDENT = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
TEACHER = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 2.0, 2.5]])


def test_kd_kl_matches_hinton_formula():
    t = 4.0
    p = torch.softmax(TEACHER / t, 1)
    q = torch.softmax(STUDENT / t, 1)
    expected = t * t * (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(kd_kl(STUDENT, TEACHER, t), expected)
    assert kd_kl(TEACHER, TEACHER, t).abs() < 1e-7


def test_base_decayed_kl_matches_unipts_formula():
    t, tau = 4.0, 8.0 * 0.99**3
    p = torch.softmax(TEACHER / t, 1)
    q = torch.softmax(STUDENT, 1)  # the student is not divided by T
    expected = t * t / 2 * sum(float((p[b] * (p[b].log() - q[b].log() / tau)).sum()) for b in range(2))
    assert math.isclose(float(base_decayed_kl(STUDENT, TEACHER, t, tau)), expected, rel_tol=1e-6)
    assert math.isclose(tau_schedule(0), 8.0) and math.isclose(tau_schedule(99), 8.0 * 0.99**99)


def test_find_blocks_from_structure():
    resnet = timm.create_model("resnet18", num_classes=10, in_chans=1)
    assert find_blocks(resnet) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=28, patch_size=7)
    assert find_blocks(vit) == [f"blocks.{i}" for i in range(12)]
    mbv2 = timm.create_model("mobilenetv2_100", num_classes=10)
    blocks = find_blocks(mbv2)
    assert len(blocks) == 17 and blocks[0] == "blocks.0.0" and blocks[-1] == "blocks.6.0"


def test_block_outputs_hooks_collect_and_detach():
    model = timm.create_model("resnet18", num_classes=10, in_chans=1).eval()
    names = find_blocks(model)
    x = torch.randn(2, 1, 28, 28)
    with BlockOutputs(model, names) as hooks:
        model(x)
    assert list(hooks.outputs) == names and hooks.outputs["layer1.0"].shape == (2, 64, 7, 7)
    assert block_mse(hooks.outputs, hooks.outputs) == 0
    assert not model.layer1[0]._forward_hooks  # hooks removed on exit
