"""Wanda: the per-row comparison of |W| * ||X_j|| with exact counts, convolutions through their unfolded
inputs (grouped included), N:M, and the sequential pass."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import PruneContext
from algorithms.wanda import InputNorms, Wanda, row_mask, wanda_mask
from ptsbench.errors import ConfigError
from ptsbench.toolkit.layerwise import check_supported, unfold_input
from ptsbench.toolkit.patterns import UNSTRUCTURED, Pattern
from ptsbench.toolkit.sparsity import PrunableLayer, find_prunable_layers
from tests.test_sparsegpt import tiny_calib


def norms_of(layer: PrunableLayer, x: torch.Tensor) -> torch.Tensor:
    stat = InputNorms(layer)
    for part in x.split(7):  # accumulated batch by batch
        stat.add(unfold_input(layer.module, part))
    return stat.squares


def test_mask_is_the_per_row_bottom_k_of_weight_times_input_norm():
    torch.manual_seed(0)
    fc = PrunableLayer("fc", nn.Linear(32, 6), "linear")
    x = torch.randn(20, 5, 32) * torch.rand(32)  # (images, tokens, features)
    mask = wanda_mask(fc, norms_of(fc, x), 6 * 20, UNSTRUCTURED)
    score = fc.weight.detach().abs() * x.reshape(-1, 32).norm(dim=0)
    expected = torch.ones(6, 32)
    expected.scatter_(1, score.topk(20, dim=1, largest=False).indices, 0.0)
    assert torch.equal(mask, expected)


def test_remainder_goes_to_the_rows_with_the_lowest_next_score():
    scores = torch.tensor([[1.0, 5.0, 9.0], [2.0, 3.0, 8.0], [0.5, 7.0, 6.0]])
    mask = row_mask(scores, 5)  # one per row, then the two lowest second scores: rows 1 (3.0) and 0 (5.0)
    assert mask.tolist() == [[0, 0, 1], [0, 0, 1], [0, 1, 1]]


def test_conv_equals_unfold_plus_linear_and_groups_read_their_own_inputs():
    torch.manual_seed(1)
    conv = PrunableLayer("c", nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), "conv")
    x = torch.randn(9, 4, 10, 10)
    patches = F.unfold(x, 3, padding=1, stride=2)  # (images, 4 * 9, positions), channel-major
    mask = wanda_mask(conv, norms_of(conv, x), 70, UNSTRUCTURED)
    for g in range(2):  # group g: outputs 3g..3g+2 read input channels 2g, 2g+1 = patch rows 18g..18g+17
        feats = patches[:, 18 * g:18 * (g + 1)].transpose(1, 2).reshape(-1, 18)
        fc = PrunableLayer("l", nn.Linear(18, 3), "linear")
        fc.module.weight.data.copy_(conv.weight.detach()[3 * g:3 * g + 3].flatten(1))
        assert torch.equal(mask[3 * g:3 * g + 3].flatten(1),
                           wanda_mask(fc, norms_of(fc, feats), 35, UNSTRUCTURED))


def test_nm_and_the_sequential_pass_on_a_small_network():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 25, 8))
    images = torch.randn(30, 4, 5, 5)
    layers = find_prunable_layers(model)
    dense_fc = model[3].weight.detach().clone()
    dense_model = copy.deepcopy(model)
    ctx = PruneContext(tiny_calib(images), torch.device("cpu"), 0, progress=False)
    algorithm = Wanda(calib_protocol="sequential")
    algorithm.set_pattern(Pattern(2, 4))
    result = algorithm.prune(model, layers, 0.5, ctx)
    for ly in layers:
        assert torch.all((ly.weight != 0).reshape(-1, 4).sum(1) == 2)
    # The Linear's norms come from the pruned conv's outputs.
    feats = model[2](model[1](model[0](images)))
    fc = PrunableLayer("l", nn.Linear(200, 8), "linear")
    fc.module.weight.data.copy_(dense_fc)
    assert torch.equal(result.masks["3"], wanda_mask(fc, norms_of(fc, feats), 0, Pattern(2, 4)))
    assert result.stats["calib_passes"] == 2 and algorithm.label == "wanda-2:4-seq"
    # The default protocol takes them from the dense conv, in one pass, as the reference vision code.
    dense = Wanda()
    dense.set_pattern(Pattern(2, 4))
    with torch.no_grad():
        dense_feats = dense_model[2](dense_model[1](dense_model[0](images)))
    from_dense = dense.prune(dense_model, find_prunable_layers(dense_model), 0.5, ctx)
    assert dense.calib_protocol == "dense" and dense.label == "wanda-2:4"
    assert from_dense.stats["calib_passes"] == 1
    assert torch.equal(from_dense.masks["3"], wanda_mask(fc, norms_of(fc, dense_feats), 0, Pattern(2, 4)))
    assert torch.equal(from_dense.masks["0"], result.masks["0"])  # the first layer sees the images either way
    assert not torch.equal(from_dense.masks["3"], result.masks["3"])


def test_convs_that_pad_themselves_are_refused():
    with pytest.raises(ConfigError, match="padding_mode='reflect'"):
        check_supported([PrunableLayer("c", nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "conv")])
    with pytest.raises(ConfigError, match="Unknown allocation"):
        Wanda(allocation="none")
