"""RIA: the relative-importance score times the input norm to the power a, compared over the whole layer with
exact counts, convolution groups reading their own inputs, N:M, and its protocol and labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import PruneContext
from algorithms.ria import RIA, ria_mask
from ptsbench.errors import ConfigError
from ptsbench.toolkit.layerwise import InputNorms, unfold_input
from ptsbench.toolkit.patterns import UNSTRUCTURED, Pattern, audit_pattern
from ptsbench.toolkit.scores.ria import ria_scores
from ptsbench.toolkit.sparsity import PrunableLayer, find_prunable_layers
from tests.test_sparsegpt import tiny_calib


def norms_of(layer: PrunableLayer, x: torch.Tensor) -> torch.Tensor:
    stat = InputNorms(layer)
    for part in x.split(7):
        stat.add(unfold_input(layer.module, part))
    return stat.squares


def test_score_is_the_share_of_row_and_column_times_the_root_input_norm():
    torch.manual_seed(0)
    fc = PrunableLayer("fc", nn.Linear(16, 5), "linear")
    x = torch.randn(30, 16) * torch.rand(16)
    w = fc.weight.detach().abs()
    expected = (w / w.sum(0) + w / w.sum(1, keepdim=True)) * x.norm(dim=0).sqrt()
    assert torch.allclose(ria_scores(fc.weight, norms_of(fc, x)), expected, rtol=1e-5)
    # the layer is one comparison group: the 40 lowest scores anywhere, not 8 per row
    mask = ria_mask(fc, norms_of(fc, x), 40, UNSTRUCTURED)
    assert int((mask == 0).sum()) == 40
    assert expected[mask == 0].max() <= expected[mask == 1].min()
    assert len(set((mask == 0).sum(1).tolist())) > 1


def test_conv_groups_read_their_own_inputs_and_zero_sums_give_no_nan():
    torch.manual_seed(1)
    conv = PrunableLayer("c", nn.Conv2d(4, 6, 3, padding=1, groups=2), "conv")
    with torch.no_grad():
        conv.weight[0].zero_()  # an all-zero row
    x = torch.relu(torch.randn(9, 4, 6, 6))
    scores = ria_scores(conv.weight, norms_of(conv, x))
    assert torch.isfinite(scores).all() and (scores[0] == 0).all()
    patches = F.unfold(x, 3, padding=1)
    for g in range(2):  # group g: outputs 3g..3g+2 read patch rows 18g..18g+17
        feats = patches[:, 18 * g:18 * (g + 1)].transpose(1, 2).reshape(-1, 18)
        fc = PrunableLayer("l", nn.Linear(18, 3), "linear")
        fc.module.weight.data.copy_(conv.weight.detach()[3 * g:3 * g + 3].flatten(1))
        expected = ria_scores(fc.weight, norms_of(fc, feats))
        assert torch.allclose(scores[3 * g:3 * g + 3].flatten(1), expected, rtol=1e-5)


def test_nm_protocol_and_labels_on_a_small_network():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 25, 8))
    ctx = PruneContext(tiny_calib(torch.randn(30, 4, 5, 5)), torch.device("cpu"), 0, progress=False)
    algorithm = RIA(bn_recalibration=True)
    algorithm.set_pattern(Pattern(2, 4))
    layers = find_prunable_layers(model)
    result = algorithm.prune(model, layers, 0.5, ctx)
    assert audit_pattern(layers, Pattern(2, 4))["pattern"] == "2:4"
    assert all(int((ly.weight == 0).sum()) == ly.numel // 2 for ly in layers)
    assert algorithm.calib_protocol == "sequential+bn" and algorithm.label == "ria-2:4+bn"
    assert result.stats["calib_passes"] == 2 + 1 + 1  # two blocks, BN before the second and after the last
    plain = RIA()
    assert plain.calib_protocol == "sequential" and plain.label == "ria-uniform"
    assert plain.options()["activation_exponent"] == 0.5
    with pytest.raises(ConfigError, match="activation_exponent"):
        RIA(activation_exponent=-1)
