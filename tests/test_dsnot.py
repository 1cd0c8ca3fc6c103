"""DSnoT: the row swaps against a plain per-row statement of the reference's loop, counts and N:M kept, the
layer's reconstruction error lowered from its starting mask, and the refinement under Wanda, SparseGPT,
RIA and magnitude (labels, options, exact counts, grown weights back at their dense values)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from algorithms.base import PruneContext
from algorithms.magnitude import MagnitudePruning
from algorithms.ria import RIA
from algorithms.sparsegpt import SparseGPT
from algorithms.wanda import Wanda, wanda_mask
from ptsbench.errors import ConfigError
from ptsbench.toolkit.dsnot import DSnoTSettings, dsnot_layer, dsnot_rows
from ptsbench.toolkit.layerwise import InputMoments, unfold_input
from ptsbench.toolkit.patterns import UNSTRUCTURED, Pattern, audit_pattern, nm_mask
from ptsbench.toolkit.sparsity import PrunableLayer, find_prunable_layers
from tests.test_sparsegpt import tiny_calib


def plain_row(w, keep, mean, var, norm, cycles, threshold, power):
    """One row as the reference's unstructured loop walks it: the growing list over every weight, the pruning
    lists split by the sign of the contribution, both pointers moving each cycle, no sign check."""
    cols = len(w)
    c = [w[j] * mean[j] for j in range(cols)]
    error = sum(c[j] for j in range(cols) if not keep[j])
    rank = [0.0 if keep[j] else c[j] / var[j] ** power for j in range(cols)]
    growing = sorted(range(cols), key=lambda j: (rank[j], j))
    kept = sorted((j for j in range(cols) if keep[j]), key=lambda j: (abs(w[j]) * norm[j], j))
    negatives, positives = [j for j in kept if c[j] < 0], [j for j in kept if c[j] > 0]
    keep = list(keep)
    low, high, n, p = 0, cols - 1, 0, 0
    for _ in range(cycles):
        if abs(error) <= threshold:
            break
        if error > 0:
            r, q, high, n = growing[high], negatives[n], high - 1, n + 1
        else:
            r, q, low, p = growing[low], positives[p], low + 1, p + 1
        keep[q], keep[r] = False, True
        error += c[q] - c[r]
    return keep


def layer_case(seed: int = 0, rows: int = 24, cols: int = 96, n: int = 2000):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.1
    # ReLU inputs of unequal scale: positive means, as a vision layer reads them
    x = torch.relu(torch.randn(n, cols, generator=g, dtype=torch.float64) + 0.3)
    x = x * (torch.rand(cols, generator=g) + 0.2)
    return w, x


def test_rows_match_a_plain_statement_of_the_reference_loop():
    w, x = layer_case()
    mean, var, norm = x.sum(0) / 40, x.var(0, unbiased=False), x.norm(dim=0)  # 40 "images" of 50 positions
    keep = torch.ones_like(w, dtype=torch.bool)
    keep.scatter_(1, (w.abs() * norm).argsort(dim=1, stable=True)[:, :48], False)
    settings = DSnoTSettings(max_cycles=12, update_threshold=0.1, variance_power=1.0)
    expanded = [t.expand_as(w) for t in (mean, var, norm)]
    new_w, new_keep, swaps = dsnot_rows(w, w * keep, keep, *expanded, settings)
    for i in range(w.shape[0]):
        expected = plain_row(w[i].tolist(), keep[i].tolist(), mean.tolist(), var.tolist(), norm.tolist(),
                             12, 0.1, 1.0)
        assert new_keep[i].tolist() == expected, i
    assert swaps > 0 and torch.equal(new_w, w * new_keep)
    assert torch.equal(new_keep.sum(1), keep.sum(1))  # every row keeps its count


def test_the_layer_reconstruction_error_drops_from_its_starting_mask():
    """DSnoT's error is that of the layer's expected output, E[W x] - E[W' x] per output channel, measured
    here on the calibration inputs themselves."""
    torch.manual_seed(0)
    conv = PrunableLayer("c", nn.Conv2d(8, 16, 3, padding=1), "conv")
    x = torch.relu(torch.randn(40, 8, 8, 8) + 0.5)
    stat = InputMoments(conv)
    for part in x.split(16):
        stat.add(unfold_input(conv.module, part))
    dense = conv.weight.detach().clone()
    mask = wanda_mask(conv, stat.squares.float(), round(0.6 * dense.numel()), UNSTRUCTURED)
    conv.weight.data.mul_(mask)
    refined, swaps = dsnot_layer(conv, dense, mask, stat, len(x), UNSTRUCTURED, DSnoTSettings())
    cols = unfold_input(conv.module, x)[0]  # (72, positions)

    def mean_error(m: torch.Tensor) -> torch.Tensor:
        return ((dense.flatten(1) * (1 - m.flatten(1))) @ cols).mean(dim=1).abs()

    # over the layer; one row may end worse, since unstructured swaps never check the sign (the reference)
    assert swaps > 0 and mean_error(refined).sum() < 0.25 * mean_error(mask).sum()
    assert int((refined == 0).sum()) == int((mask == 0).sum())
    assert torch.equal(conv.weight.detach(), dense * refined)  # no weight update: the dense values, masked


def test_nm_groups_keep_n_and_swaps_keep_the_sign_of_the_error():
    w, x = layer_case(1)
    mean, var, norm = (t.expand_as(w) for t in (x.sum(0) / 40, x.var(0, unbiased=False), x.norm(dim=0)))
    keep = nm_mask(w.abs() * norm, 2, 4).bool()
    new_w, new_keep, swaps = dsnot_rows(w, w * keep, keep, mean, var, norm, DSnoTSettings(), m=4)
    assert swaps > 0 and torch.all(new_keep.reshape(-1, 4).sum(1) == 2)
    before = ((w * ~keep) * mean).sum(1)
    after = ((w * ~new_keep) * mean).sum(1)
    assert torch.all((after.sign() == before.sign()) | (after == before))
    assert after.abs().sum() < before.abs().sum()


def small_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 25, 10))


# Statistics from the dense network, so that the method's run without DSnoT prunes every layer from the same
# inputs and its masks are the ones DSnoT started from.
@pytest.mark.parametrize("make, label", [
    (lambda: Wanda(refine="dsnot", bn_recalibration=True), "wanda+dsnot-uniform+bn"),
    (lambda: SparseGPT(refine="dsnot", bn_recalibration=True, calib_protocol="dense"),
     "sparsegpt+dsnot-uniform-dense+bn"),
    (lambda: RIA(refine="dsnot", calib_protocol="dense"), "ria+dsnot-uniform-dense"),
    (lambda: MagnitudePruning(refine="dsnot", allocation="erk", bn_recalibration=True,
                              calib_protocol="dense"),
     "magnitude+dsnot-erk-dense+bn"),
])
def test_refinement_moves_each_method_s_mask_and_keeps_its_counts(make, label):
    model = small_net()
    base = copy.deepcopy(model)
    dense_weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    ctx = PruneContext(tiny_calib(torch.randn(30, 3, 5, 5) + 0.5), torch.device("cpu"), 0, progress=False)
    algorithm = make()
    plain = make()
    plain.dsnot = None
    layers = find_prunable_layers(model)
    result = algorithm.prune(model, layers, 0.7, ctx)
    start = plain.prune(base, find_prunable_layers(base), 0.7, ctx)
    assert algorithm.label == label and algorithm.options()["refine"] == "dsnot"
    assert result.stats["dsnot_swaps"] > 0 and result.allocation == start.allocation
    moved = 0
    for ly in layers:
        assert int((result.masks[ly.name] == 0).sum()) == round(result.allocation[ly.name] * ly.numel)
        assert torch.equal(result.masks[ly.name].flatten(1).sum(1), start.masks[ly.name].flatten(1).sum(1))
        moved += int((result.masks[ly.name] != start.masks[ly.name]).sum())
        grown = (result.masks[ly.name] == 1) & (start.masks[ly.name] == 0)
        assert torch.equal(ly.weight.detach()[grown], dense_weights[f"{ly.name}.weight"][grown])
    assert moved > 0


def test_refinement_keeps_nm_and_its_options_are_checked():
    ctx = PruneContext(tiny_calib(torch.randn(30, 3, 5, 5) + 0.5), torch.device("cpu"), 0, progress=False)
    for algorithm in (Wanda(refine="dsnot", dsnot={"max_cycles": 5}),
                      MagnitudePruning(refine="dsnot", bn_recalibration=True)):  # sequential+bn
        model = small_net()
        algorithm.set_pattern(Pattern(2, 4))
        layers = find_prunable_layers(model)
        result = algorithm.prune(model, layers, 0.5, ctx)
        audit_pattern(layers, Pattern(2, 4))  # raises on a group with more than 2 of 4 kept
        assert result.stats["dsnot_swaps"] > 0
    # the stem (rows of 27) stays dense under 2:4: a pass per other layer, BN before the second and at the end
    assert result.stats["calib_passes"] == 2 + 1 + 1
    assert algorithm.options()["calib_protocol"] == "sequential+bn"
    assert algorithm.label == "magnitude+dsnot-2:4+bn"
    wanda = Wanda(refine="dsnot", dsnot={"max_cycles": 5})
    assert wanda.options()["dsnot_max_cycles"] == 5 and wanda.label == "wanda+dsnot-uniform"
    with pytest.raises(ConfigError, match="algorithm.refine=none"):
        Wanda(dsnot={"max_cycles": 5})
    with pytest.raises(ConfigError, match="algorithm.refine"):
        SparseGPT(refine="swap")
    with pytest.raises(ConfigError, match="algorithm.dsnot.max_cycles"):
        Wanda(refine="dsnot", dsnot={"max_cycles": 0})
    with pytest.raises(ConfigError, match="says where DSnoT.s statistics come from"):
        MagnitudePruning(calib_protocol="dense")
    assert MagnitudePruning(refine="dsnot", calib_protocol="dense").label == "magnitude+dsnot-uniform-dense"
