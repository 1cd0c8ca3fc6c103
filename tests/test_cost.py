"""The harness's cost accounting (ptsbench.cost): passes counted through every copy of the model, peak
memory of the prune alone, MACs dense and sparse, and the speed label."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from algorithms.base import PruneContext
from algorithms.fcpts import FCPTS
from algorithms.magnitude import MagnitudePruning
from ptsbench.cost import (
    PassCounter,
    PruneCost,
    count_macs,
    inference_cost,
    is_semi_structured,
    speed_label,
)
from ptsbench.data import InMemoryImages
from ptsbench.toolkit.patterns import Pattern, parse_pattern
from ptsbench.toolkit.sparsity import PrunableLayer, find_prunable_layers

ROOT = Path(__file__).resolve().parent.parent


def prune_with_cost(algorithm, model, calib, target=0.8):
    layers = find_prunable_layers(model)
    ctx = PruneContext(calib=calib, device=torch.device("cpu"), seed=0, progress=False)
    with PruneCost(model, torch.device("cpu")) as cost:
        result = algorithm.prune(model, layers, target, ctx)
    return result, layers, cost.record()


def test_magnitude_runs_no_pass_and_bn_reestimation_runs_the_calibration_set_once(tiny_dense):
    dense, calib = tiny_dense
    _, _, plain = prune_with_cost(MagnitudePruning(allocation="uniform"), copy.deepcopy(dense), calib)
    assert (plain["forward_passes"], plain["backward_passes"]) == (0, 0)
    bn_magnitude = MagnitudePruning(allocation="uniform", bn_recalibration=True)
    _, _, bn = prune_with_cost(bn_magnitude, copy.deepcopy(dense), calib)
    assert bn["forward_passes"] == len(calib) == 128
    assert bn["forward_calls"] == len(calib) // 64 and bn["backward_passes"] == 0


def test_fcpts_teacher_copy_is_counted_and_backward_only_through_the_student(tiny_dense):
    """FCPTS deep-copies the model as its frozen teacher: per iteration one teacher and one student
    forward of a batch, one backward through the student's output (the sparsity loss does not reach it);
    the BN re-estimation after the exact correction adds one pass over the calibration set."""
    dense, calib = tiny_dense
    iterations, batch = 3, 32
    for bn in (False, True):
        algo = FCPTS(optimization={"iterations": iterations, "batch_size": batch}, channels_last=False,
                     bn_recalibration=bn)
        result, _, cost = prune_with_cost(algo, copy.deepcopy(dense), calib)
        recalibrated = len(calib) if result.stats["bn_recalibrated_layers"] else 0
        # a 3-step run never lands on the exact count: the correction moves weights
        assert not bn or recalibrated
        assert cost["forward_passes"] == 2 * iterations * batch + recalibrated
        assert cost["backward_passes"] == iterations * batch
        assert cost["backward_calls"] == iterations


def test_wanda_partial_passes_are_counted_once_per_block(tiny_dense):
    """Wanda stops each calibration pass after the block it prunes (an exception inside the forward): every
    such pass still runs the calibration images into the network and is counted."""
    from algorithms.wanda import Wanda

    dense, calib = tiny_dense
    # the protocol that stops a pass per block (Wanda's default takes every norm in one dense pass)
    result, _, cost = prune_with_cost(Wanda(calib_protocol="sequential"), copy.deepcopy(dense), calib,
                                      target=0.5)
    assert result.stats["calib_passes"] > 1
    assert cost["forward_passes"] == result.stats["calib_passes"] * len(calib)
    assert cost["backward_passes"] == 0
    # the counter's nesting depth is balanced after the interrupted forwards: a later full pass counts
    with PassCounter(dense) as counter:
        dense(calib.data.images[:3])
    assert counter.record()["forward_passes"] == 3
    one, _, cost = prune_with_cost(Wanda(), copy.deepcopy(dense), calib, target=0.5)
    assert one.stats["calib_passes"] == 1 and cost["forward_passes"] == len(calib)


def test_blocks_alone_and_nested_modules_of_the_same_class_are_not_passes():
    inner = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    model = nn.Sequential(inner, nn.Flatten(), nn.Sequential(nn.LazyLinear(3)))
    x = torch.randn(5, 1, 6, 6)
    model(x)
    with PassCounter(model) as counter:
        model(x)  # nested Sequentials inside: one pass of 5 images
        inner(x)  # a block alone (same class, fewer layers): no pass
        copy.deepcopy(model)(x[:2]).sum().backward()  # a copy: a pass forward and backward
        with torch.no_grad():
            model(x)
    model(x)  # after the context: not counted
    assert counter.record() == {"forward_passes": 12, "backward_passes": 2, "forward_calls": 3,
                                "backward_calls": 1}


def test_peak_memory_is_the_prune_alone_not_the_process_lifetime():
    # In a fresh process: a long test session keeps freed memory resident, which hides a new allocation.
    script = """
import json, torch
from ptsbench.cost import PeakMemory
with PeakMemory(torch.device("cpu")) as big:
    block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    block.add_(1)
    del block
with PeakMemory(torch.device("cpu")) as small:
    torch.ones(16).sum()
print(json.dumps([big.values, small.values]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    big, small = json.loads(out.stdout.strip().splitlines()[-1])
    if big["peak_memory_source"] != "rss:vmhwm_reset":
        pytest.skip("no resettable RSS high-water mark on this system (not Linux)")
    assert big["peak_memory_mb"] - small["peak_memory_mb"] > 200
    assert small["peak_rss_mb"] == small["peak_memory_mb"] > 0


def test_uniform_magnitude_at_0_8_keeps_a_fifth_of_the_prunable_macs(tiny_dense):
    dense, calib = tiny_dense
    result, layers, _ = prune_with_cost(MagnitudePruning(), copy.deepcopy(dense), calib, 0.8)
    macs = count_macs(result.model, layers, calib.data.images[:1])
    assert macs["macs_model"] >= macs["macs_dense"] > 0
    assert abs(macs["macs_sparse"] / macs["macs_dense"] - 0.2) < 0.01
    assert result.model.training is dense.training  # the model's mode is restored


def test_strided_padded_conv_counts_every_tap_once_per_output_position():
    """FlopCounterMode counts taps that read padding as the dense kernel computes them; with that
    convention each weight is used Hout*Wout times, so MACs over non-zero weights are exact."""
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    model = nn.Sequential(conv)
    x = torch.randn(1, 3, 11, 9)
    h_out, w_out = model(x).shape[-2:]
    assert (h_out, w_out) == (6, 5)
    macs = count_macs(model, [PrunableLayer("0", conv, "conv")], x)
    assert macs["macs_dense"] == 8 * 3 * 3 * 3 * h_out * w_out
    assert macs["macs_sparse"] == int(conv.weight.count_nonzero()) * h_out * w_out


def test_speed_labels_follow_the_pattern_and_the_device():
    macs = {"macs_model": 1000, "macs_dense": 800, "macs_sparse": 400}
    assert speed_label(parse_pattern("unstructured"), macs, None, [], None, torch.device("cpu"),
                       8) == {"speed": "none"}
    cpu = speed_label(Pattern(2, 4), macs, None, [], None, torch.device("cpu"), 8)
    assert cpu == {"speed": "theoretical", "speedup_theoretical": pytest.approx(1000 / 600)}
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3]])
    assert is_semi_structured(w)
    assert not is_semi_structured(torch.tensor([[1.0, 1, 1, 0, 0, 0, 0, 0]]))


def test_inference_cost_on_a_tiny_model_gives_every_record_key():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[1].weight[:, ::2] = 0
    layers = [PrunableLayer("1", model[1], "linear"), PrunableLayer("3", model[3], "linear")]
    test = InMemoryImages(torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))
    out = inference_cost(model, layers, test, torch.device("cpu"), pattern="2:4")
    assert out["macs_dense"] == 16 * 8 + 8 * 2 and out["macs_sparse"] == 8 * 8 + 8 * 2
    assert out["speed"] == "theoretical" and out["speedup_theoretical"] > 1


def test_report_shows_cost_columns_only_when_records_have_them():
    import pandas as pd

    from ptsbench.analysis.report import markdown_table, results_table

    old = {"model": "m", "method": "a", "target_sparsity": 0.5, "seed": 0, "status": "ok", "top1": 1.0}
    new = dict(old, method="b", forward_passes=128, backward_passes=0, peak_memory_mb=10.0, speed="none")
    assert "fwd images" not in markdown_table(results_table(pd.DataFrame([old])))
    shown = markdown_table(results_table(pd.DataFrame([old, new])))
    assert "fwd images" in shown and "peak MiB" in shown and "| none" in shown
