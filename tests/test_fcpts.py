"""FCPTS: the bridge's slope, what drives the thresholds, exact final sparsity, the augmented calibration
stream, BatchNorm after the correction, determinism, the presets, one job.

The model is the tiny dense ResNet-18 the harness trains on real Fashion-MNIST (shared with the runner
tests through the session cache), so the bridge is checked on trained weights, not on synthetic ones.
"""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from algorithms.base import PruneContext
from algorithms.fcpts import FCPTS
from algorithms.fcpts.bridge import bridge_sparsity, count_at_or_below
from algorithms.fcpts.calibration import (
    CROP_RATIO,
    CROP_SCALE,
    calibration_stream,
    random_crop_boxes,
    random_resized_crop_flip,
    resized_crop_flip,
)
from algorithms.fcpts.thresholds import (
    MaskSTE,
    attach_thresholds,
    count_masks,
    exact_counts,
    global_sparsity,
    hard_masked,
    layer_magnitudes,
    layer_sparsities,
    original_weight,
    sparsity_loss,
    ste_masked,
)
from ptsbench.audit import audit_model
from ptsbench.data import CalibrationSet
from ptsbench.errors import ConfigError, NonFiniteLossError
from ptsbench.runner import run_job
from ptsbench.toolkit.bn import batchnorm_layers, recalibrate_batchnorm
from ptsbench.toolkit.compiled import MaybeCompiled, maybe_compiled
from ptsbench.toolkit.distill import kd_kl
from ptsbench.toolkit.sparsity import (
    PrunableLayer,
    counts_at_thresholds,
    counts_from_rates,
    erk_allocation,
    find_prunable_layers,
    masks_from_counts,
    sorted_magnitudes,
)
from tests.conftest import compose_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dense(tiny_dense) -> tuple[torch.nn.Module, CalibrationSet]:
    return tiny_dense


def fresh(dense) -> tuple[torch.nn.Module, list[PrunableLayer]]:
    model = copy.deepcopy(dense[0])
    return model, find_prunable_layers(model)


def context(dense, seed: int = 0) -> PruneContext:
    return PruneContext(calib=dense[1], device=CPU, seed=seed, progress=False)


# ------------------------------------------------------------------------------------------ bridge


@pytest.mark.parametrize("bridge,tolerance", [("kde", 0.05), ("histogram", 0.15)])
def test_bridge_slope_matches_finite_difference_of_the_count(dense, bridge, tolerance):
    """dS/dt from the bridge vs the slope of the exact count over a window holding 4% of the weights,
    on one trained layer per stage (147k to 2.4M weights), at layer sparsities 0.3 to 0.9.

    Tolerances: the Gaussian KDE is smooth and agrees within 5%; the 100-bin histogram is a step
    function whose bins are wide next to the window, so it gets 15%.
    """
    model, _ = fresh(dense)
    for name in ("layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"):
        w = model.get_submodule(name).weight.detach()
        a = torch.sort(w.abs().reshape(-1)).values
        n = a.numel()
        for q in (0.3, 0.5, 0.7, 0.9):
            t = a[round(q * n)].clone().requires_grad_(True)
            s = bridge_sparsity(t, w, bridge)
            count = int(torch.searchsorted(a, t.detach(), right=True))
            assert s.item() == pytest.approx(count / n, rel=1e-6)  # forward: the exact count (float32)
            s.backward()
            lo, hi = a[round((q - 0.02) * n)], a[round((q + 0.02) * n)]
            inside = torch.searchsorted(a, hi, right=True) - torch.searchsorted(a, lo, right=True)
            fd = float(inside) / n / float(hi - lo)
            assert float(t.grad) == pytest.approx(fd, rel=tolerance), f"{name} at sparsity {q}"


# ----------------------------------------------------------------------------------- what moves t


def test_sparsity_loss_alone_moves_erk_thresholds_to_the_target(dense):
    """From ERK at 50%, L_c with the method's own optimiser and schedule reaches 60% (no L_rec)."""
    model, layers = fresh(dense)
    layers = [ly for ly in layers if not ly.name.startswith(("layer3", "layer4"))]  # keeps the test fast
    gates = attach_thresholds(layers, counts_from_rates(layers, erk_allocation(layers, 0.5), 0.5),
                              "sparsity_only")
    algo = FCPTS(optimization={"iterations": 150}, objective={"sparsity_loss": "abs"})
    optimizer, scheduler = algo._optimizer(model, gates, iters_per_epoch=2)
    start = global_sparsity(layers, layer_sparsities(layers, gates, "kde", "silverman")).item()
    for step in range(algo.optim.iterations):
        s = global_sparsity(layers, layer_sparsities(layers, gates, "kde", "silverman"))
        optimizer.zero_grad(set_to_none=True)
        sparsity_loss(s, 0.6, "abs").backward()
        optimizer.step()
        scheduler.step_update(step + 1)
    end = global_sparsity(layers, layer_sparsities(layers, gates, "kde", "silverman")).item()
    assert start == pytest.approx(0.5, abs=1e-4)
    assert end == pytest.approx(0.6, abs=2e-3)
    assert all(original_weight(ly).grad is None for ly in layers)  # weights untouched: thresholds did it


def test_mask_ste_gradient_is_minus_half_sum_w_dl_dweff():
    w = torch.tensor([0.3, -0.1, 0.05, -0.4])
    t = torch.tensor(0.2, requires_grad=True)
    c = torch.tensor([1.0, 2.0, -3.0, 0.5])  # L = sum c * W_eff, so dL/dW_eff = c
    weff = w * MaskSTE.apply(w.abs() - t)
    assert weff.tolist() == pytest.approx([0.3, 0.0, 0.0, -0.4])
    (c * weff).sum().backward()
    assert float(t.grad) == pytest.approx(-0.5 * float((w * c).sum()))


@pytest.mark.parametrize("threshold_grad", ["ste", "sparsity_only"])
def test_reconstruction_reaches_thresholds_only_with_ste(dense, threshold_grad):
    model, layers = fresh(dense)
    teacher = copy.deepcopy(model).train()
    gates = attach_thresholds(layers, counts_from_rates(layers, erk_allocation(layers, 0.8), 0.8),
                              threshold_grad)
    images = dense[1].data.images[:32]
    with torch.no_grad():
        t_logits = teacher(images)
    kd_kl(model.train()(images), t_logits).backward()
    grads = [g.score.grad for g in gates]
    if threshold_grad == "ste":
        assert all(g is not None and torch.isfinite(g) for g in grads)
        assert sum(float(g) != 0.0 for g in grads) >= len(gates) - 1
    else:
        assert all(g is None for g in grads)
    assert all(original_weight(ly).grad is not None for ly in layers)  # weights learn in both modes


# ------------------------------------------------------------------------------------ exact ending


def test_exact_counts_hit_every_total_and_keep_a_hit_allocation():
    torch.manual_seed(0)
    mods = [torch.nn.Linear(n, 64) for n in (50, 300, 1000)]
    layers = [PrunableLayer(f"l{i}", m, "linear") for i, m in enumerate(mods)]
    gates = attach_thresholds(layers, {"l0": 1000, "l1": 9000, "l2": 40000}, "ste")
    total = sum(ly.numel for ly in layers)
    sorted_abs = layer_magnitudes(layers)
    for target in (0.1, 0.5, 0.6, 0.77, 0.95):
        counts = exact_counts(layers, gates, sorted_abs, target).counts
        assert sum(counts.values()) == round(target * total)
        masks = count_masks(layers, sorted_abs, counts)
        assert all(int((masks[n] == 0).sum()) == counts[n] for n in counts)
    learned = exact_counts(layers, gates, sorted_abs, 50000 / total)
    assert learned.counts == learned.learned_counts == {"l0": 1000, "l1": 9000, "l2": 40000}
    assert learned.logit_shift == 0.0


def test_exact_counts_with_tied_magnitudes():
    torch.manual_seed(1)
    lin = torch.nn.Linear(100, 100)
    with torch.no_grad():
        lin.weight.copy_(lin.weight.sign() * (lin.weight.abs() * 20).ceil() / 20)  # |w| is 0.05 or 0.1
    layers = [PrunableLayer("tied", lin, "linear")]
    gates = attach_thresholds(layers, {"tied": 3000}, "ste")
    sorted_abs = layer_magnitudes(layers)
    for target in (0.05, 0.33, 0.5, 0.81):
        counts = exact_counts(layers, gates, sorted_abs, target).counts
        assert counts["tied"] == round(target * 10_000)
        assert int((count_masks(layers, sorted_abs, counts)["tied"] == 0).sum()) == counts["tied"]


def test_prune_ends_exactly_on_target_and_is_deterministic(dense):
    """lambda = 0 lets L_rec move the thresholds freely, so the correction has a residual to remove."""
    algo = FCPTS(optimization={"iterations": 3, "batch_size": 32, "lr": 0.05},
                 objective={"sparsity_lambda": 0.0}, bridge={"threshold_grad": "ste"}, log_every=1)
    runs = []
    for _ in range(2):
        model, layers = fresh(dense)
        result = algo.prune(model, layers, 0.9, context(dense, seed=7))
        audit = audit_model(result.model, layers, 0.9, result.allocation)
        total = sum(ly.numel for ly in layers)
        assert audit.zeros == round(0.9 * total)
        assert audit.max_layer_error < 1.0
        assert abs(result.stats["residual_before_correction"]) > 1e-6
        assert result.stats["correction_weights_moved"] > 0
        traj = result.tables["allocation_trajectory"]
        assert set(traj["iteration"]) == {0, 1, 2} and len(traj) == 3 * len(layers)
        runs.append(result)
    a, b = runs
    assert all(torch.equal(a.masks[name], b.masks[name]) for name in a.masks)
    assert a.stats["residual_before_correction"] == b.stats["residual_before_correction"]


@pytest.mark.slow
@pytest.mark.parametrize("threshold_grad,bridge", [("ste", "kde"), ("sparsity_only", "histogram")])
def test_compiled_masks_and_counts_give_the_eager_run(dense, threshold_grad, bridge):
    """`compile=true` fuses the threshold mask and the bridge count: the same masks and allocation as the
    eager run; the thresholds agree up to the rounding of their gradient's sum over each layer."""
    algo = FCPTS(optimization={"iterations": 4, "batch_size": 32, "lr": 0.05},
                 bridge={"threshold_grad": threshold_grad, "kind": bridge}, log_every=1)
    results = []
    for compiled in (False, True):
        model, layers = fresh(dense)
        ctx = PruneContext(calib=dense[1], device=CPU, seed=3, progress=False, compile=compiled)
        results.append(algo.prune(model, layers, 0.8, ctx))
    masked = ste_masked if threshold_grad == "ste" else hard_masked
    assert maybe_compiled(masked, True).compiled is not None  # it compiled rather than falling back
    assert maybe_compiled(count_at_or_below, True).compiled is not None
    eager, fused = results
    assert all(torch.equal(eager.masks[name], fused.masks[name]) for name in eager.masks)
    assert eager.allocation == fused.allocation
    a, b = (r.tables["allocation_trajectory"]["threshold"].to_numpy() for r in results)
    assert a == pytest.approx(b, rel=1e-5)


def test_compile_failure_falls_back_to_eager_with_a_warning(caplog):
    def boom(*args):
        raise RuntimeError("no C++ compiler\nsecond line")

    wrapper = MaybeCompiled(lambda w, s: w * s, enabled=True)
    wrapper.compiled = boom
    with caplog.at_level("WARNING"):
        out = wrapper(torch.tensor([2.0]), torch.tensor(3.0))
    assert out.item() == 6.0 and wrapper.compiled is None
    assert "compile=true" in caplog.text and "RuntimeError: no C++ compiler" in caplog.text


def test_nan_loss_stops_the_run(dense):
    model, layers = fresh(dense)
    with torch.no_grad():
        layers[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="FCPTS reconstruction loss became nan at step 0"):
        FCPTS(optimization={"iterations": 2, "batch_size": 32}).prune(model, layers, 0.5, context(dense))


# ------------------------------------------------------------------- shared primitives (sparsity.py)


def test_counts_at_thresholds_and_masks_from_counts_on_sorted_magnitudes():
    w = torch.tensor([[0.3, -0.1, 0.05], [-0.4, 0.2, -0.05]])
    sorted_abs = sorted_magnitudes([w])
    assert counts_at_thresholds(sorted_abs, [0.0]) == [0]
    assert counts_at_thresholds(sorted_abs, [0.1]) == [3]  # |w| <= t: 0.05, 0.05, 0.1
    assert counts_at_thresholds(sorted_abs, [0.35]) == [5]
    for k in range(7):
        (mask,) = masks_from_counts([w], sorted_abs, [k])
        assert int((mask == 0).sum()) == k
        kept = w.abs()[mask.bool()]
        assert k in (0, 6) or float(kept.min()) >= float(w.abs()[~mask.bool()].max())
    (tied,) = masks_from_counts([w], sorted_abs, [1])  # 0.05 twice: position breaks the tie
    assert tied.tolist() == [[1, 1, 0], [1, 1, 1]]


# ---------------------------------------------------------------------------- calibration stream


@pytest.mark.parametrize("box,flip", [((0, 0, 28, 28), False), ((3, 5, 11, 17), False),
                                      ((10, 0, 18, 9), True), ((0, 20, 28, 8), True)])
def test_resized_crop_flip_matches_torchvision_on_tensors(box, flip):
    """The one-grid_sample crop equals torchvision's tensor resized_crop (+ horizontal flip)."""
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([box, box], dtype=torch.float64)
    ours = resized_crop_flip(images, boxes, torch.tensor([flip, flip]))
    top, left, h, w = box
    theirs = TF.resized_crop(images, top, left, h, w, [28, 28], antialias=False)
    theirs = TF.horizontal_flip(theirs) if flip else theirs
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_random_crop_boxes_follow_torchvision_get_params():
    """Same distribution as torchvision's RandomResizedCrop.get_params (drawn per image, in a loop)."""
    g = torch.Generator().manual_seed(3)
    boxes = random_crop_boxes(4000, 28, 28, g)
    top, left, h, w = boxes.unbind(1)
    assert bool(((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0) & (top + h <= 28) & (left + w <= 28)).all())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tv = torch.tensor([RandomResizedCrop.get_params(torch.zeros(1, 28, 28), list(CROP_SCALE),
                                                        list(CROP_RATIO))
                           for _ in range(4000)], dtype=torch.float64)
    for ours, theirs, tol in [(h * w / 784, tv[:, 2] * tv[:, 3] / 784, 0.02),
                              (w / h, tv[:, 3] / tv[:, 2], 0.03),
                              (top, tv[:, 0], 0.4), (left, tv[:, 1], 0.4)]:
        assert float(ours.mean()) == pytest.approx(float(theirs.mean()), abs=tol)
        assert float(ours.min()) >= float(theirs.min()) - tol and \
            float(ours.max()) <= float(theirs.max()) + tol
    assert torch.equal(boxes, random_crop_boxes(4000, 28, 28, torch.Generator().manual_seed(3)))
    # a 1 x 40 strip admits no box of the allowed areas and ratios: torchvision's central fallback
    assert random_crop_boxes(3, 1, 40, g).tolist() == [[0, 19, 1, 1]] * 3


def test_augmented_stream_is_seeded_and_off_means_plain_batches(dense):
    calib = dense[1]
    plain = next(calibration_stream(calib, 32, CPU, torch.Generator().manual_seed(1)))
    first = next(calibration_stream(calib, 32, CPU, torch.Generator().manual_seed(1),
                                    torch.Generator().manual_seed(2)))
    again = next(calibration_stream(calib, 32, CPU, torch.Generator().manual_seed(1),
                                    torch.Generator().manual_seed(2)))
    order = torch.randperm(len(calib), generator=torch.Generator().manual_seed(1))[:32]
    assert torch.equal(plain, calib.data.images[order])
    assert torch.equal(first, again) and first.shape == plain.shape
    assert not torch.allclose(first, plain)
    flipped = random_resized_crop_flip(plain, torch.Generator().manual_seed(5))
    assert flipped.shape == plain.shape and torch.isfinite(flipped).all()


# ------------------------------------------------------------------- BatchNorm after the correction


@pytest.mark.parametrize("bn_recalibration", [True, False])
def test_bn_is_reestimated_when_the_correction_moves_weights(dense, bn_recalibration):
    """lambda = 0 leaves the learned sparsity off target, so the correction prunes untrained weights."""
    model, layers = fresh(dense)
    algo = FCPTS(optimization={"iterations": 2, "batch_size": 32, "lr": 0.05},
                 objective={"sparsity_lambda": 0.0}, bn_recalibration=bn_recalibration)
    result = algo.prune(model, layers, 0.9, context(dense))
    assert result.stats["correction_weights_moved"] > 0
    expected = copy.deepcopy(result.model)
    recalibrate_batchnorm(expected, dense[1], CPU, batch_size=32)
    same = [torch.allclose(a.running_var, b.running_var, rtol=1e-5)
            for a, b in zip(batchnorm_layers(result.model), batchnorm_layers(expected), strict=True)]
    if bn_recalibration:
        assert result.stats["bn_recalibrated_layers"] == len(same) > 0 and all(same)
    else:
        assert result.stats["bn_recalibrated_layers"] == 0 and not all(same)


# ---------------------------------------------------------------------------------- options, a job


def test_options_labels_budgets_and_bad_choices():
    assert FCPTS().label == "fcpts-ste-kde"
    assert FCPTS(bridge={"threshold_grad": "sparsity_only", "kind": "histogram"},
                 optimization={"iterations": 120}).label == \
        "fcpts-sparsity_only-hist-120it"
    assert FCPTS(optimization={"iterations": 64, "augment": False}).label == "fcpts-ste-kde-noaug-64it"
    assert [FCPTS(optimization={"iterations": n}).options()["budget"] for n in (1600, 64, 400)] == \
        ["reference", "quick", "0.25x"]
    assert FCPTS(bridge={"kind": "histogram"}).options()["bridge"] == "histogram"
    for node, option, value, match in [("bridge", "kind", "kdee", "Did you mean: kde"),
                                       ("bridge", "threshold_grad", "st", "sparsity_only, ste"),
                                       ("objective", "sparsity_loss", "l1", "abs, pow2")]:
        with pytest.raises(ConfigError, match=f"Unknown algorithm.{node}.{option} '{value}'.*{match}"):
            FCPTS(**{node: {option: value}})
    with pytest.raises(ConfigError,
                       match=r"algorithm.optimization.iterations=0 is not allowed: "
                             r"it must be a whole number >= 1"):
        FCPTS(optimization={"iterations": 0})
    with pytest.raises(ConfigError, match=r"algorithm.erk_power_scale=0 is not allowed"):
        FCPTS(erk_power_scale=0)
    half = FCPTS(budget=0.25)
    assert half.optim.iterations == 400 and half.label == "fcpts-ste-kde-400it" and \
        half.family == "fcpts-ste-kde"
    assert half.budget_fraction == 0.25 and FCPTS(budget="reference").optim.iterations == 1600


@pytest.mark.parametrize("preset,label,iterations", [
    ("fcpts", "fcpts-ste-kde", 1600), ("fcpts_quick", "fcpts-ste-kde-64it", 64),
    ("fcpts_code", "fcpts-sparsity_only-hist", 1600),
    ("fcpts_code_quick", "fcpts-sparsity_only-hist-64it", 64)])
def test_presets_are_the_paper_and_the_released_code(preset, label, iterations):
    algo = instantiate(compose_config([f"algorithm={preset}"]).algorithm)
    assert isinstance(algo, FCPTS) and algo.label == label and algo.optim.iterations == iterations
    paper = not preset.startswith("fcpts_code")
    assert (algo.bridge.kind, algo.bridge.threshold_grad) == \
        (("kde", "ste") if paper else ("histogram", "sparsity_only"))
    assert algo.optim.augment and algo.bn_recalibration and algo.optim.lr == 0.01 and \
        algo.optim.batch_size == 64


@pytest.mark.slow
def test_fcpts_quick_job_records_ok_with_residual(tiny_cfg, tmp_path):
    record = run_job(tiny_cfg("algorithm=fcpts_code_quick", "sparsity=0.7",
                              "algorithm.optimization.iterations=6", "algorithm.log_every=2"), tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["status"] == "ok" and record["method"] == "fcpts-sparsity_only-hist-6it"
    assert saved["algorithm_options"]["budget"] == "0.00375x" and \
        saved["algorithm_options"]["augment"] is True
    assert saved["achieved_sparsity"] == pytest.approx(0.7, abs=1e-6)
    assert saved["max_layer_count_error"] < 1.0
    stats = saved["stats"]
    assert {"residual_before_correction", "learned_global_sparsity", "seconds_teacher", "seconds_student",
            "seconds_bridge", "seconds_data", "correction_weights_moved", "bn_recalibrated_layers"} <= \
        set(stats)
    assert stats["iterations"] == 6 and stats["budget"] == "0.00375x"
    assert stats["learned_global_sparsity"] - 0.7 == pytest.approx(stats["residual_before_correction"])
    assert abs(stats["residual_before_correction"]) < 0.01
    assert (stats["bn_recalibrated_layers"] > 0) == (stats["correction_weights_moved"] > 0)
    traj = pd.read_csv(tmp_path / "allocation_trajectory.csv")
    assert sorted(set(traj["iteration"])) == [0, 2, 4, 5]
    assert traj["sparsity"].between(0, 1).all()
