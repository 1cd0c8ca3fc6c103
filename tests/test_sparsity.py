"""Allocation math, exact counts, masks through parametrize, and the independent audit."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn
from torch.nn.utils import parametrize

from ptsbench.audit import audit_model
from ptsbench.errors import ConfigError
from ptsbench.toolkit.allocations import allocate
from ptsbench.toolkit.sparsity import (
    PrunePolicy,
    apply_masks,
    bake_masks,
    counts_from_rates,
    erk_allocation,
    find_prunable_layers,
    magnitude_mask,
    magnitude_masks,
    rates,
)

TARGETS = [0.0, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10, in_chans=1)


@pytest.fixture(scope="module")
def layers(resnet):
    return find_prunable_layers(resnet)


def test_discovery_finds_every_conv_and_linear_with_kinds(resnet, layers):
    convs = [m for m in resnet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == len(convs) == 21
    assert layers[0].name == "conv1" and layers[0].kind == "first_conv"
    assert layers[-1].name == "fc" and layers[-1].kind == "classifier"
    assert {ly.kind for ly in layers} == {"first_conv", "conv", "classifier"}


def test_policy_excludes_first_conv_and_classifier(resnet):
    layers = find_prunable_layers(resnet, PrunePolicy(first_conv=False, classifier=False))
    names = [ly.name for ly in layers]
    assert "conv1" not in names and "fc" not in names and len(names) == 19


def test_depthwise_and_attention_kinds():
    mbv2 = timm.create_model("mobilenetv2_100", num_classes=10)
    kinds = {ly.kind for ly in find_prunable_layers(mbv2)}
    assert "depthwise_conv" in kinds
    assert not any(ly.kind == "depthwise_conv"
                   for ly in find_prunable_layers(mbv2, PrunePolicy(depthwise=False)))
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=28, patch_size=7, in_chans=1)
    vit_layers = find_prunable_layers(vit)
    assert sum(ly.kind == "attention" for ly in vit_layers) == 24  # qkv and proj in 12 blocks
    assert vit_layers[0].kind == "first_conv" and vit_layers[-1].kind == "classifier"


@pytest.mark.parametrize("method", ["uniform", "erk", "global", "global_l2norm"])
@pytest.mark.parametrize("target", TARGETS)
def test_allocation_hits_target_exactly(layers, method, target):
    counts = allocate(layers, target, method)
    total = sum(ly.numel for ly in layers)
    assert sum(counts.values()) == round(target * total)
    for ly in layers:
        assert 0 <= counts[ly.name] <= ly.numel


@pytest.mark.parametrize("target", [0.5, 0.9, 0.99])
def test_uniform_counts_within_one_weight_per_layer(layers, target):
    counts = allocate(layers, target, "uniform")
    for ly in layers:
        assert abs(counts[ly.name] - target * ly.numel) < 1.0


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_erk_keeps_parameter_weighted_mean_and_favours_small_layers(layers, target):
    r = erk_allocation(layers, target)
    total = sum(ly.numel for ly in layers)
    assert math.isclose(sum(r[ly.name] * ly.numel for ly in layers) / total, target, rel_tol=1e-9)
    assert all(0.0 <= v < 1.0 for v in r.values())
    # the first conv (few weights, large sum/prod ratio) keeps more than the biggest 3x3 conv
    biggest = max(layers, key=lambda ly: ly.numel)
    assert r["conv1"] < r[biggest.name]


def test_erk_makes_layers_dense_and_resolves():
    # one tiny layer whose ERK density would exceed 1 at high sparsity
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 512, 3), nn.Flatten(), nn.Linear(512, 512))
    layers = find_prunable_layers(model)
    r = erk_allocation(layers, 0.9)
    assert r["0"] == 0.0  # made dense
    total = sum(ly.numel for ly in layers)
    assert math.isclose(sum(r[ly.name] * ly.numel for ly in layers) / total, 0.9, rel_tol=1e-9)


def test_erk_power_scale_zero_is_uniform(layers):
    r = erk_allocation(layers, 0.7, power_scale=0.0)
    assert all(math.isclose(v, 0.7) for v in r.values())


def test_global_threshold_is_one_threshold(layers):
    counts = allocate(layers, 0.8, "global")
    masks = magnitude_masks(layers, counts)
    kept_min = min(ly.weight.abs()[masks[ly.name].bool()].min() for ly in layers
                   if counts[ly.name] < ly.numel)
    pruned_max = max(ly.weight.abs()[~masks[ly.name].bool()].max() for ly in layers if counts[ly.name] > 0)
    assert pruned_max <= kept_min


def test_global_ties_broken_by_position():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].weight.copy_(torch.tensor([[0.5, 1.0], [1.0, 2.0]]))
    layers = find_prunable_layers(model)
    # sorted: 0.5 (layer 1), then five 1.0s: four in layer 0 come first by position
    assert allocate(layers, 0.5, "global") == {"0": 3, "1": 1}
    assert allocate(layers, 0.75, "global") == {"0": 4, "1": 2}


def test_global_l2norm_differs_from_global(layers):
    assert allocate(layers, 0.8, "global") != allocate(layers, 0.8, "global_l2norm")


def test_counts_from_rates_largest_remainder():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))  # 9 weights each
    layers = find_prunable_layers(model)
    counts = counts_from_rates(layers, {ly.name: 0.5 for ly in layers}, target=0.5)
    assert sum(counts.values()) == round(0.5 * 27) == 14
    assert sorted(counts.values()) == [4, 5, 5]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "abc", None])
def test_bad_sparsity_is_named(layers, bad):
    with pytest.raises(ConfigError, match=r"sparsity"):
        allocate(layers, bad, "uniform")


def test_unknown_allocation_lists_choices(layers):
    with pytest.raises(ConfigError, match=r"Unknown allocation 'ekr'.*erk.*global.*Did you mean: erk"):
        allocate(layers, 0.5, "ekr")


def test_magnitude_mask_exact_count_and_ties():
    w = torch.tensor([[0.5, -0.1, 0.1, 2.0], [0.1, 0.0, -3.0, 0.1]])
    m = magnitude_mask(w, 3)
    assert int((m == 0).sum()) == 3
    # |w| ascending with position tie-break: 0.0 (5), then the first two 0.1s (1, 2)
    assert m.flatten().tolist() == [1, 0, 0, 1, 1, 0, 1, 1]
    assert torch.equal(magnitude_mask(w, 3), m)  # deterministic


def test_masks_via_parametrize_then_baked(layers):
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    ls = find_prunable_layers(model)
    counts = allocate(ls, 0.7, "erk")
    masks = magnitude_masks(ls, counts)
    apply_masks(ls, masks)
    assert parametrize.is_parametrized(ls[0].module, "weight")
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        out_masked = model(x)
    bake_masks(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), out_masked)
    audit = audit_model(model, ls, 0.7, rates(ls, counts))
    assert audit.zeros == sum(counts.values())
    assert abs(audit.achieved - 0.7) < 1e-6
    assert audit.max_layer_error < 1.0
    assert audit.achieved_all < audit.achieved  # BN and biases are dense
    assert list(audit.layers.columns[:6]) == ["name", "type", "shape", "params", "target_sparsity",
                                              "achieved_sparsity"]


def test_audit_counts_zeros_independently():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    layers = find_prunable_layers(model)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 1, 0, 1]] * 4))
    # the claimed allocation says 25%, the weights say 50%: the audit reports the weights
    audit = audit_model(model, layers, 0.25, {"0": 0.25})
    assert audit.achieved == 0.5 and audit.achieved_all == 0.5
    assert audit.max_layer_error == 4.0
