"""POT and the reconstruction axis: BN folding, weight and bias correction, layer/block reconstruction,
cross-applied allocation files, and POT end to end through the runner."""

from __future__ import annotations

import copy
import json
import statistics

import pandas as pd
import pytest
import timm
import torch

from algorithms.base import PruneContext
from algorithms.pot import POT
from ptsbench.errors import ConfigError
from ptsbench.runner import run_job
from ptsbench.toolkit.allocations import allocate
from ptsbench.toolkit.bnfold import find_conv_bn_pairs, fold_batchnorm
from ptsbench.toolkit.reconstruct import (
    ReconstructionSettings,
    block_units,
    collect_inputs,
    correct_bias,
    correct_weights,
    layer_units,
    output_error,
    process_units,
    unit_outputs,
)
from ptsbench.toolkit.sparsity import apply_masks, bake_masks, find_prunable_layers, magnitude_masks

CPU = torch.device("cpu")


def randomised_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("arch,convs", [("resnet18", 20), ("mobilenetv2_100", 52)])
def test_bn_folding_keeps_the_dense_outputs(arch, convs):
    torch.manual_seed(0)
    model = randomised_bn(timm.create_model(arch, num_classes=10, in_chans=1))
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        before = model(x)
    pairs = find_conv_bn_pairs(model, x[:2])
    assert len(pairs) == convs  # every conv of these models feeds exactly one BN
    fold_batchnorm(model, pairs)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    bn = model.get_submodule(pairs[0].bn)
    assert torch.all(bn.running_mean == 0) and torch.all(bn.weight == 1)  # now a pure bias carrier


def test_exact_moment_correction_matches_channel_mean_and_std():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * 0.1 + 0.01
    for sparsity in (0.5, 0.8, 0.9):
        mask = torch.ones_like(w).reshape(-1)
        mask[torch.argsort(w.abs().reshape(-1))[: round(sparsity * w.numel())]] = 0
        mask = mask.view_as(w)
        corrected = correct_weights(w, mask, "exact_moments")
        assert torch.all(corrected[mask == 0] == 0)  # zeros stay zeros
        assert torch.all(corrected[mask == 1] != 0)
        flat, dense = corrected.reshape(16, -1), w.reshape(16, -1)
        kept = mask.reshape(16, -1).sum(1)
        ok = kept > 1
        torch.testing.assert_close(flat.mean(1)[ok], dense.mean(1)[ok], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(flat.std(1)[ok], dense.std(1)[ok], rtol=1e-4, atol=1e-6)
        # without the correction, pruning shrinks each channel's spread
        assert torch.all((w * mask).reshape(16, -1).std(1)[ok] < dense.std(1)[ok])


def test_exact_moments_leave_a_channel_with_one_kept_weight_alone():
    w = torch.tensor([[0.3, -0.2, 0.1, -0.25], [0.5, 0.4, -0.3, 0.2]])
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0]])
    corrected = correct_weights(w, mask, "exact_moments")
    assert corrected[0].tolist() == pytest.approx([0.3, 0, 0, 0])  # not the channel sum (-0.05)
    assert corrected[1].mean().item() == pytest.approx(w[1].mean().item())


def test_msbench_weight_correction_by_hand():
    """msbench (DefaultFakeSparse.before_run): scale = std(W) / std(W * M), unbiased, over all entries;
    shift = mean(W) - mean(W * M * scale); the kept weights become w * scale + shift."""
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    scale = statistics.stdev([1, 2, 3, 4]) / (statistics.stdev([0, 0, 3, 4]) + 1e-9)
    shift = 2.5 - statistics.mean([0, 0, 3 * scale, 4 * scale])
    corrected = correct_weights(w, mask)  # msbench is the default
    assert corrected[0].tolist() == pytest.approx([0, 0, 3 * scale + shift, 4 * scale + shift], rel=1e-6)


def test_msbench_correction_keeps_single_weight_depthwise_channels_alive():
    torch.manual_seed(0)
    w = torch.randn(32, 1, 3, 3) * 0.1
    mask = torch.zeros_like(w)
    mask.view(32, 9)[:, 4] = 1  # each depthwise channel keeps one tap
    corrected = correct_weights(w, mask, "msbench").view(32, 9)
    spread = w.view(32, 9).std(1)
    assert torch.all(corrected[:, 4].abs() > 0.5 * spread)  # about the channel's spread, not ~0
    assert torch.all(corrected[mask.view(32, 9) == 0] == 0)
    with pytest.raises(ConfigError, match="weight_correction 'exact'.*exact_moments"):
        correct_weights(w, mask.view_as(w), "exact")


@pytest.fixture
def folded(tiny_dense):
    """The tiny trained ResNet-18, BN-folded, pruned to 80% (global L2-normalised), and its dense twin.

    Built afresh per test: a model with parametrizations must not be deep-copied and then baked, since
    torch's parametrized class is shared between the copies and removing it from one breaks the other.
    """
    model, calib = copy.deepcopy(tiny_dense[0]), tiny_dense[1]
    pairs = find_conv_bn_pairs(model, calib.data.images[:2])
    fold_batchnorm(model, pairs)
    carriers = {p.conv: p.bn for p in pairs}
    dense = copy.deepcopy(model)
    layers = find_prunable_layers(model)
    masks = magnitude_masks(layers, allocate(layers, 0.8, "global_l2norm"))
    apply_masks(layers, masks)
    return model, dense, layers, masks, carriers, calib


def mean_channel_error(model, unit, inputs, targets) -> float:
    """Mean over channels of |mean output error of that channel| over samples and positions."""
    with torch.no_grad():
        diff = targets - unit_outputs(model, unit, inputs)
    return diff.transpose(0, 1).reshape(diff.shape[1], -1).mean(1).abs().mean().item()


def test_bias_correction_removes_the_mean_output_error(folded):
    model, dense, layers, _, carriers, calib = folded
    for unit in layer_units(layers, carriers)[:6]:
        inputs = collect_inputs(dense, unit.name, calib, 64, CPU)
        targets = unit_outputs(dense, unit, inputs)
        before, mse_before = (mean_channel_error(model, unit, inputs, targets),
                              output_error(model, unit, inputs, targets))
        shift = correct_bias(model, unit, inputs, targets)
        assert shift is not None and shift > 0
        after = mean_channel_error(model, unit, inputs, targets)
        assert after < 1e-3 * max(before, 1e-12) + 1e-6  # mean error per channel gone
        assert output_error(model, unit, inputs, targets) <= mse_before  # and the MSE can only drop


@pytest.mark.slow
@pytest.mark.parametrize("mode,inputs", [("layer", "dense"), ("block", "sparse")])
def test_reconstruction_lowers_each_unit_error_and_never_revives_pruned_weights(folded, mode, inputs):
    model, dense, layers, masks, carriers, calib = folded
    units = layer_units(layers, carriers) if mode == "layer" else block_units(model, layers, carriers)
    if mode == "block":
        assert [u.name for u in units if u.kind == "block"] == \
            [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)]
        assert {u.name for u in units if u.kind == "layer"} == {"conv1", "fc"}
    settings = ReconstructionSettings(mode, inputs, iterations=30, lr=1e-4, bias_lr=1e-3, batch_size=32)
    reports = process_units(model, dense, units, calib, settings, CPU, torch.Generator().manual_seed(0))
    assert len(reports) == len(units)
    assert all(r.steps == 30 and r.error_after <= r.error_before for r in reports)
    improved = [r.error_after < 0.9 * r.error_before for r in reports]
    assert sum(improved) >= 0.8 * len(reports), reports  # a tuned unit is only kept where it got better
    bake_masks(model)
    for ly in find_prunable_layers(model):
        assert torch.all(ly.weight[masks[ly.name] == 0] == 0), ly.name


@pytest.mark.slow
def test_pot_prunes_exactly_and_deterministically(tiny_dense):
    runs = []
    for _ in range(2):
        model = copy.deepcopy(tiny_dense[0])
        layers = find_prunable_layers(model)
        ctx = PruneContext(calib=tiny_dense[1], device=CPU, seed=3, progress=False)
        result = POT(reconstruction={"iterations": 5, "lr": 1e-4, "bias_lr": 1e-3}).prune(
            model, layers, 0.9, ctx)
        zeros = sum(int((ly.weight == 0).sum()) for ly in layers)
        assert zeros == round(0.9 * sum(ly.numel for ly in layers))
        assert result.stats["bn_folded"] == 20
        table = result.tables["reconstruction"]
        assert len(table) == len(layers) and (table["steps"] == 5).all()
        assert result.stats["mean_error_after"] < result.stats["mean_error_before"]
        runs.append((result.masks, [ly.weight.detach().clone() for ly in layers]))
    (m1, w1), (m2, w2) = runs
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2, strict=True))


def test_bad_reconstruction_choices_are_named():
    with pytest.raises(ConfigError,
                       match="Unknown algorithm.reconstruction.mode 'blocks'.*Did you mean: block"):
        POT(reconstruction={"mode": "blocks"})
    with pytest.raises(ConfigError, match="Unknown algorithm.reconstruction.inputs 'teacher'"):
        POT(reconstruction={"inputs": "teacher"})
    with pytest.raises(ConfigError, match="'algorithm.reconstruction.iterz'.*Did you mean: iterations"):
        POT(reconstruction={"iterz": 5})
    with pytest.raises(ConfigError,
                       match=r"algorithm.reconstruction.lr=-1 is not allowed: it must be a number >= 0"):
        POT(reconstruction={"lr": -1})
    assert POT().label == "pot" and POT(reconstruction={"mode": "block", "inputs": "sparse"}).label == \
        "pot-blockrecon-sparseinp"
    with pytest.raises(ConfigError, match="Unknown algorithm.weight_correction 'std'"):
        POT(weight_correction="std")
    assert POT(weight_correction=True).weight_correction == "msbench"  # older configs' boolean
    assert POT(weight_correction=False).label == "pot-nowc"
    assert POT(weight_correction="exact_moments").label == "pot-exactwc"
    # a preset is its steps and its rates: the quick preset is 200 steps at 10x msbench's rates
    quick = {"iterations": 200, "lr": 1e-4, "bias_lr": 1e-3}
    assert POT().options()["budget"] == "reference" and \
        POT(reconstruction=quick).options()["budget"] == "quick"
    assert POT(reconstruction=quick).label == "pot-quick" and \
        POT(reconstruction=quick, budget=25).label == "pot-5000steps"
    # not msbench's
    assert POT(reconstruction={**quick, "iterations": 20_000}).options()["budget"] == "custom"
    assert POT(reconstruction={**quick, "iterations": 20_000}).label == "pot-20000steps"
    assert POT(reconstruction={"iterations": 200}).label == "pot-200steps-msbenchlr"
    assert POT(budget=0.5).label == "pot-10000steps-msbenchlr" and \
        POT(budget=0.25).label != POT(reconstruction=quick, budget=25).label
    assert POT(reconstruction={"lr": 3e-5}).label == "pot-20000steps-lr3e-05"
    assert POT(budget=0.5).budget_fraction == 0.5 and POT(budget=0.5).family == "pot"


@pytest.mark.slow
def test_pot_quick_job_and_reload(tiny_cfg, tmp_path):
    """Through the runner: folded BN carriers survive the compact checkpoint round trip."""
    record = run_job(tiny_cfg("algorithm=pot_quick", "sparsity=0.8", "algorithm.reconstruction.iterations=3",
                              "save_sparse=true"), tmp_path)
    assert record["status"] == "ok" and record["method"] == "pot-3steps" and record["method_family"] == "pot"
    assert record["achieved_sparsity"] == pytest.approx(0.8, abs=1e-6)
    assert record["reload_top1"] == pytest.approx(record["top1"])
    assert record["top1"] > 30.0  # corrected and calibrated, 80% sparse: well above chance (10%)
    assert len(pd.read_csv(tmp_path / "reconstruction.csv")) == 21


@pytest.mark.slow
def test_allocation_file_from_one_job_drives_another(tiny_cfg, tmp_path):
    """A POT job's allocation.csv, read by magnitude with layer reconstruction: identical per-layer counts."""
    first = tmp_path / "pot"
    run_job(tiny_cfg("algorithm=pot_quick", "sparsity=0.7", "algorithm.reconstruction.iterations=0"), first)
    second = tmp_path / "cross"
    record = run_job(tiny_cfg("algorithm=magnitude", "algorithm.allocation=from_file",
                              f"algorithm.allocation_file={first / 'allocation.csv'}", "sparsity=0.7",
                              "algorithm.reconstruction.mode=layer", "algorithm.reconstruction.iterations=3",
                              "algorithm.reconstruction.lr=1e-4"), second)
    assert record["method"] == "magnitude-from_file+layer"
    a = pd.read_csv(first / "allocation.csv").set_index("name")
    b = pd.read_csv(second / "allocation.csv").set_index("name")
    assert a["zeros"].to_dict() == b["zeros"].to_dict()
    saved = json.loads((second / "result.json").read_text())
    assert saved["stats"]["units"] == 21 and \
        saved["stats"]["mean_error_after"] < saved["stats"]["mean_error_before"]


@pytest.mark.slow  # a whole POT run, block units after the per-layer bias pass
def test_pot_with_block_units_still_corrects_every_layer_bias(tiny_dense):
    model = copy.deepcopy(tiny_dense[0])
    layers = find_prunable_layers(model)
    ctx = PruneContext(calib=tiny_dense[1], device=CPU, seed=0, progress=False)
    result = POT(reconstruction={"mode": "block", "iterations": 2, "lr": 1e-4}).prune(model, layers, 0.8, ctx)
    table = result.tables["reconstruction"]
    bias_pass, block_pass = table.iloc[:len(layers)], table.iloc[len(layers):]
    assert bias_pass["bias_shift"].notna().all() and (bias_pass["steps"] == 0).all()  # every layer has a bias
    assert list(block_pass["kind"]).count("block") == 8 and (block_pass["steps"] == 2).all()
