"""SparseGPT against a direct (slow, textbook) OBS implementation, convolutions against the same layer written
as unfold + Linear, N:M masks, and the sequential pass on a small network."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import PruneContext
from algorithms.sparsegpt import Hessian, SparseGPT, lowest_per_group, prune_layer, sparsegpt_prune
from ptsbench.data import CalibrationSet, InMemoryImages
from ptsbench.errors import ConfigError
from ptsbench.toolkit.layerwise import unfold_input
from ptsbench.toolkit.patterns import UNSTRUCTURED, Pattern, audit_pattern
from ptsbench.toolkit.sparsity import PrunableLayer, find_prunable_layers

DAMP = 0.01


def dampened(h: torch.Tensor) -> torch.Tensor:
    h = h.clone().double()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag += DAMP * diag.mean()
    return h


def textbook_mask(w: torch.Tensor, h: torch.Tensor, n_zero: int) -> torch.Tensor:
    """One block: the lowest w_j^2 / [H_F^-1]_00, F = columns j.. (the frozen columns before j left out);
    inputs that never fired cost nothing (saliency 0)."""
    dead = h.diagonal() == 0
    h = dampened(h)
    denom = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(h.shape[0])])
    saliency = (w.double().pow(2) / denom).masked_fill(dead, 0.0)
    drop = torch.zeros(w.numel(), dtype=torch.bool)
    drop[torch.sort(saliency.reshape(-1), stable=True).indices[:n_zero]] = True
    return drop.view_as(w)


def textbook_obs(w: torch.Tensor, h: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Each row, column by column: a removed weight w_j moves the unfrozen ones by -w_j / [H_F^-1]_00 times
    the first row of H_F^-1 (the OBS update), then columns j.. lose j."""
    h, w = dampened(h), w.clone().double()
    for j in range(w.shape[1]):
        inv = torch.linalg.inv(h[j:, j:])
        for r in torch.nonzero(drop[:, j]).flatten().tolist():
            w[r, j:] -= w[r, j] / inv[0, 0] * inv[0]
            w[r, j] = 0.0
    return w


@pytest.fixture
def linear_case():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 48, generator=g) * 0.1
    x = torch.randn(48, 3000, generator=g) * (torch.rand(48, 1, generator=g) + 0.2)
    x[5] = 0.0  # an input that never fires
    return w, 2.0 / x.shape[1] * x @ x.T


def test_one_block_equals_textbook_obs(linear_case):
    w, h = linear_case
    n_zero = round(0.6 * w.numel())
    new, drop = sparsegpt_prune(w[None], h[None], torch.tensor([n_zero]), blocksize=128, percdamp=DAMP)
    assert torch.equal(drop[0], textbook_mask(w, h, n_zero))
    assert int(drop.sum()) == n_zero and torch.all(new[drop] == 0)
    assert torch.allclose(new[0].double(), textbook_obs(w, h, drop[0]), atol=1e-5, rtol=0)


def test_lazy_blocks_give_the_same_updates_for_their_mask(linear_case):
    w, h = linear_case
    n_zero = round(0.5 * w.numel()) + 7
    new, drop = sparsegpt_prune(w[None], h[None], torch.tensor([n_zero]), blocksize=16, percdamp=DAMP)
    assert int(drop.sum()) == n_zero  # exact, spread over the three blocks
    assert torch.allclose(new[0].double(), textbook_obs(w, h, drop[0]), atol=1e-5, rtol=0)


def test_nm_masks_follow_the_pattern_and_the_obs_update(linear_case):
    w, h = linear_case
    new, drop = sparsegpt_prune(w[None], h[None], None, Pattern(2, 4), blocksize=10, percdamp=DAMP)
    assert torch.all((new[0] != 0).reshape(-1, 4).sum(1) == 2)
    assert torch.allclose(new[0].double(), textbook_obs(w, h, drop[0]), atol=1e-5, rtol=0)


def test_zero_sparsity_leaves_the_layer_unchanged(linear_case):
    w, h = linear_case
    layer = nn.Linear(48, 24)
    layer.weight.data.copy_(w)
    mask = prune_layer(PrunableLayer("fc", layer, "linear"), h[None], 0, UNSTRUCTURED)
    assert torch.equal(layer.weight.data, w) and torch.all(mask == 1)


def conv_hessian(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    stat = Hessian(PrunableLayer("c", conv, "conv"))
    stat.add(unfold_input(conv, x))
    return stat.matrix()


def test_conv_equals_unfold_plus_linear():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(5, 6, 11, 11)
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 54)  # rows: (image, position)
    linear = nn.Linear(54, 8)
    linear.weight.data.copy_(conv.weight.detach().flatten(1))
    linear.bias.data.copy_(conv.bias.detach())
    assert torch.allclose(linear(patches), conv(x).permute(0, 2, 3, 1).reshape(-1, 8), atol=1e-5)
    h_lin = 2.0 / len(patches) * patches.T @ patches
    assert torch.allclose(conv_hessian(conv, x)[0], h_lin, atol=1e-5)
    n_zero = round(0.7 * conv.weight.numel())
    mask_conv = prune_layer(PrunableLayer("c", conv, "conv"), conv_hessian(conv, x), n_zero, UNSTRUCTURED)
    mask_lin = prune_layer(PrunableLayer("l", linear, "linear"), h_lin[None], n_zero, UNSTRUCTURED)
    assert torch.equal(mask_conv.flatten(1), mask_lin)
    assert torch.allclose(conv.weight.detach().flatten(1), linear.weight.detach(), atol=1e-5)


def test_depthwise_conv_is_one_small_layer_per_channel():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    x = torch.randn(3, 4, 7, 7)
    dense = conv.weight.detach().clone()
    mask = prune_layer(PrunableLayer("dw", conv, "depthwise_conv"), conv_hessian(conv, x), 16, UNSTRUCTURED)
    for c in range(4):  # channel c alone: a Linear with 9 inputs, its own Hessian and 16 / 4 zeros
        single = nn.Conv2d(1, 1, 3, padding=1)
        single.weight.data.copy_(dense[c:c + 1])
        single_mask = prune_layer(PrunableLayer("s", single, "conv"), conv_hessian(single, x[:, c:c + 1]), 4,
                                  UNSTRUCTURED)
        assert torch.equal(mask[c], single_mask[0])
        assert torch.allclose(conv.weight.detach()[c], single.weight.detach()[0], atol=1e-6)


def tiny_calib(images: torch.Tensor) -> CalibrationSet:
    return CalibrationSet(InMemoryImages(images, torch.zeros(len(images), dtype=torch.long)),
                          list(range(len(images))), 0)


def test_sequential_pass_calibrates_each_layer_on_the_pruned_prefix():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 36, 16))
    images = torch.randn(40, 2, 6, 6)
    reference = copy.deepcopy(model)
    layers = find_prunable_layers(model)
    algorithm = SparseGPT()
    algorithm.set_pattern(Pattern(2, 4))
    result = algorithm.prune(model, layers, 0.5,
                             PruneContext(tiny_calib(images), torch.device("cpu"), 0, progress=False))
    assert audit_pattern(layers, Pattern(2, 4))["pattern_dense_layers"] == ["0"]  # rows of 18
    assert result.allocation == {"0": 0.0, "2": 0.5, "5": 0.5} and result.stats["calib_passes"] == 2
    # By hand: conv "2" and then the Linear, each on the outputs of the layers pruned before it.
    conv, fc = reference[2], reference[5]
    feats = reference[1](reference[0](images))
    prune_layer(PrunableLayer("2", conv, "conv"), conv_hessian(conv, feats), 0, Pattern(2, 4))
    flat = reference[4](reference[3](conv(feats)))
    prune_layer(PrunableLayer("5", fc, "linear"), (2.0 / len(flat) * flat.T @ flat)[None], 0, Pattern(2, 4))
    assert torch.allclose(model[2].weight, conv.weight, atol=1e-5)
    assert torch.allclose(model[5].weight, fc.weight, atol=1e-4)
    assert torch.equal(result.masks["5"], (fc.weight != 0).float())


def test_options_are_checked():
    with pytest.raises(ConfigError, match="algorithm.percdamp=0"):
        SparseGPT(percdamp=0)
    with pytest.raises(ConfigError, match="Unknown allocation 'erkk'"):
        SparseGPT(allocation="erkk")
    assert SparseGPT(allocation="erk").label == "sparsegpt-erk"


def test_block_mask_takes_exact_counts_per_group_ties_by_position():
    saliency = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 5.0, 2.0]], [[3.0, 1.0, 2.0], [1.0, 1.0, 9.0]]])
    drop = lowest_per_group(saliency, torch.tensor([4, 2]))
    assert drop.tolist() == [[[True, True, True], [True, False, False]],
                             [[False, True, False], [True, False, False]]]
    same = lowest_per_group(saliency, torch.tensor([3, 3]))  # equal counts: the k-th value path
    assert same.sum(dim=(1, 2)).tolist() == [3, 3] and same[0, 0, 1] and not same[0, 0, 0]


def test_sequential_bn_protocol_calibrates_each_block_on_a_prefix_with_reestimated_batchnorm():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 16))
    images = torch.randn(40, 2, 6, 6)
    model.train()
    for _ in range(5):  # non-trivial running statistics, as a trained network has
        model(images * 2 + 1)
    model.eval()
    reference, stale = copy.deepcopy(model), copy.deepcopy(model)
    layers = find_prunable_layers(model)
    calib = tiny_calib(images)
    ctx = PruneContext(calib, torch.device("cpu"), 0, progress=False)
    # sequential+bn: the default with BN
    result = SparseGPT(bn_recalibration=True).prune(model, layers, 0.5, ctx)
    SparseGPT(bn_recalibration=True, calib_protocol="sequential").prune(
        stale, find_prunable_layers(stale), 0.5, ctx)
    # a pass per block, a re-estimation before blocks 2 and 3, the last
    assert result.stats["calib_passes"] == 3 + 2 + 1

    # By hand: each layer's Hessian from a prefix whose BN was re-estimated after the layers before
    # it were pruned
    from ptsbench.toolkit.bn import recalibrate_batchnorm
    n_zero = {0: 72, 3: 288, 7: 2304}
    for index in (0, 3, 7):
        recalibrate_batchnorm(reference, calib, "cpu", 64)
        reference.eval()
        with torch.no_grad():
            feats = reference[:index](images)
        layer = reference[index]
        if isinstance(layer, nn.Conv2d):
            hessian = conv_hessian(layer, feats)
        else:
            hessian = (2.0 / len(feats) * feats.T @ feats)[None]
        prune_layer(PrunableLayer(str(index), layer, "conv"), hessian, n_zero[index], UNSTRUCTURED)
    recalibrate_batchnorm(reference, calib, "cpu", 64)
    for index in (0, 3, 7):
        assert torch.allclose(model[index].weight, reference[index].weight, atol=1e-4)
    assert torch.allclose(model[4].running_mean, reference[4].running_mean, atol=1e-5)
    # and it is not what calibrating on the stale statistics gives
    assert not torch.allclose(model[7].weight, stale[7].weight, atol=1e-3)


def test_calib_protocols_are_checked_named_and_labelled():
    with pytest.raises(ConfigError, match="calib_protocol=sequential\\+bn.*bn_recalibration=true"):
        SparseGPT(calib_protocol="sequential+bn")
    with pytest.raises(ConfigError,
                       match="algorithm.calib_protocol.*'stale'.*dense, sequential, sequential\\+bn"):
        SparseGPT(calib_protocol="stale")
    # the defaults: SparseGPT as its reference (sequential), along with BN when BN is re-estimated
    assert SparseGPT().calib_protocol == "sequential" and SparseGPT().label == "sparsegpt-uniform"
    bn = SparseGPT(bn_recalibration=True)
    assert bn.calib_protocol == "sequential+bn" and bn.label == "sparsegpt-uniform+bn"
    assert bn.options()["calib_protocol"] == "sequential+bn"
    assert SparseGPT(bn_recalibration=True, calib_protocol="sequential").label == "sparsegpt-uniform-seq+bn"
    assert SparseGPT(calib_protocol="dense").label == "sparsegpt-uniform-dense"
