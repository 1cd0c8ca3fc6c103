"""Error correction and local reconstruction after pruning: POT's and PTSBench's "reconstruction" axis.

* `correct_weights`: per output channel, an affine map of the kept weights towards the dense channel's
  statistics: msbench's std-ratio scale and mean shift (POT's default), or an exact mean and second
  moment solve.
* `correct_bias`: per output channel, the mean output error of a unit on calibration data is added to
  its bias, so the pruned unit is unbiased on that data.
* `reconstruct_units`: each unit (a single conv/linear layer, or a residual / transformer block) is
  tuned with Adam so its output matches the dense unit's output, on the dense model's inputs or on the
  sparse model's own inputs. Pruned weights stay zero: the masks are parametrizations (W * M), so the
  optimiser may move a pruned entry of the underlying tensor but the weight the model uses stays 0,
  and baking the mask writes zeros.

A unit's output is its module's output plus, for a convolution whose BatchNorm was folded
(`ptsbench.toolkit.bnfold`), the bias the folded BN carries, so "layer output" means conv + bias as in POT.
Inputs and dense outputs are collected once per unit over the calibration set (batches in a fixed
order) and kept as tensors; each step draws a random batch from them, as msbench does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ptsbench.data import CalibrationSet
from ptsbench.errors import ensure_finite, unknown_choice
from ptsbench.settings import COUNT, NON_NEGATIVE, NON_NEGATIVE_COUNT, Settings, option
from ptsbench.toolkit.distill import find_blocks
from ptsbench.toolkit.sparsity import PrunableLayer

log = logging.getLogger(__name__)

RECONSTRUCTIONS = ("none", "layer", "block")
RECON_INPUTS = ("dense", "sparse")
WEIGHT_CORRECTIONS = ("msbench", "exact_moments", "none")
REFERENCE_STEPS = 20_000  # msbench's Adam steps per unit (conf/reconstruction/msbench.yaml)
QUICK_STEPS = 200  # conf/reconstruction/quick.yaml, the CPU benchmark's budget
REFERENCE_RATES = (1e-5, 1e-4)  # msbench's (weights, biases) learning rates
QUICK_RATES = (1e-4, 1e-3)  # 10x, to move as far in the quick preset's 100x fewer steps
# The random stream of the reconstruction batches (ctx.generator; ptsbench/streams.py).
RECONSTRUCTION_STREAM = "reconstruction.batches"


def reconstructs(settings: ReconstructionSettings) -> bool:
    """Whether units are reconstructed (mode layer or block): the `recon_*` options are recorded only then."""
    return settings.mode != "none"


@dataclass(frozen=True)
class ReconstructionSettings(Settings):
    """How units are reconstructed: the `reconstruction` node of magnitude pruning and POT.

    msbench's reference (conf/reconstruction/msbench.yaml): Adam, 1e-5 weights, 1e-4 biases, 20,000 steps
    of batch 64 per unit; `algorithm.budget` scales the steps.
    """

    # Recorded as `reconstruction` (the mode) and, when a unit is reconstructed, `recon_*`.
    # none | layer (one conv/linear) | block (residual or transformer block)
    mode: str = option("none", RECONSTRUCTIONS, record="reconstruction")
    # dense: the dense model's activations; sparse: the sparse model's own
    inputs: str = option("dense", RECON_INPUTS, record="recon_inputs", when=reconstructs)
    # Adam steps per unit (batch batch_size, drawn from the calibration set)
    iterations: int = option(REFERENCE_STEPS, NON_NEGATIVE_COUNT, record="recon_iterations",
                             when=reconstructs)
    # weights (tensors with two or more dimensions)
    lr: float = option(REFERENCE_RATES[0], NON_NEGATIVE, record="recon_lr", when=reconstructs)
    # biases and normalisation parameters
    bias_lr: float = option(REFERENCE_RATES[1], NON_NEGATIVE, record="recon_bias_lr", when=reconstructs)
    batch_size: int = option(64, COUNT, record=False)
    # stop a unit once its batch loss falls below this
    early_stop_loss: float = option(1e-5, NON_NEGATIVE, record=False)


def reconstruction_rates(settings: ReconstructionSettings) -> str:
    """'reference' or 'quick' where the learning rates are that preset's, else 'custom'."""
    rates = (settings.lr, settings.bias_lr)
    return "reference" if rates == REFERENCE_RATES else "quick" if rates == QUICK_RATES else "custom"


def reconstruction_budget(settings: ReconstructionSettings) -> str:
    """'reference' (msbench's 20,000 Adam steps per unit at its rates), 'quick' (200 steps at 10x the rates)
    or 'custom': a preset is its steps and its rates together (20,000 quick-rate steps are not msbench's)."""
    presets = {"reference": REFERENCE_STEPS, "quick": QUICK_STEPS}
    rates = reconstruction_rates(settings)
    return rates if presets.get(rates) == settings.iterations else "custom"


def reconstruction_tags(settings: ReconstructionSettings) -> list[str]:
    """A label's words for the budget: none at the reference, 'quick' at the quick preset, else the steps and,
    unless they are the quick preset's (the committed budget curves scale it), the rates."""
    budget = reconstruction_budget(settings)
    if budget != "custom":
        return [] if budget == "reference" else [budget]
    tags = [f"{settings.iterations}steps"]
    rates = reconstruction_rates(settings)
    if rates == "reference":
        tags.append("msbenchlr")
    elif rates == "custom":
        tags.append(f"lr{settings.lr:g}")
    return tags


@dataclass
class Unit:
    """A layer or block to correct or reconstruct, named as in the model (student and teacher alike)."""

    name: str
    kind: str  # "layer" or "block"
    carrier: str | None = None  # the folded BN that carries this layer's bias, if any

    def module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.name)

    def bias(self, model: nn.Module) -> torch.Tensor | None:
        if self.carrier is not None:
            return model.get_submodule(self.carrier).bias
        return getattr(self.module(model), "bias", None) if self.kind == "layer" else None

    def output(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = self.module(model)(x)
        if self.carrier is not None:
            y = y + self.bias(model).view(1, -1, *([1] * (y.dim() - 2)))
        return y


def channel_dim(y: torch.Tensor) -> int:
    """Channels of an NCHW feature map are dim 1; of a (B, tokens, C) or (B, C) activation the last."""
    return 1 if y.dim() == 4 else -1


def layer_units(layers: list[PrunableLayer], carriers: Mapping[str, str] | None = None) -> list[Unit]:
    carriers = carriers or {}
    return [Unit(ly.name, "layer", carriers.get(ly.name)) for ly in layers]


def block_units(model: nn.Module, layers: list[PrunableLayer], carriers: Mapping[str, str] | None = None
                ) -> list[Unit]:
    """Blocks found from the module structure, plus every prunable layer outside all blocks (stem, head,
    classifier) as a layer unit, in module order."""
    carriers = carriers or {}
    blocks = find_blocks(model)
    inside = {ly.name for ly in layers if any(ly.name.startswith(b + ".") for b in blocks)}
    prunable = {ly.name for ly in layers}
    units = []
    for name, _ in model.named_modules():
        if name in blocks:
            units.append(Unit(name, "block"))
        elif name in prunable and name not in inside:
            units.append(Unit(name, "layer", carriers.get(name)))
    return units


def make_units(mode: str, model: nn.Module, layers: list[PrunableLayer],
               carriers: Mapping[str, str] | None = None) -> list[Unit]:
    if mode == "layer":
        return layer_units(layers, carriers)
    if mode == "block":
        return block_units(model, layers, carriers)
    return []


class _StopForward(Exception):
    """Raised by a hook once a unit's input is captured: the rest of the network need not run."""


@torch.no_grad()
def collect_inputs(model: nn.Module, name: str, calib: CalibrationSet, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """The input of module `name` for every calibration image (fixed order), in inference mode."""
    chunks: list[torch.Tensor] = []

    def hook(_module, inputs):
        chunks.append(inputs[0].detach().clone())  # clone: later in-place ops (ReLU, +=) must not alter it
        raise _StopForward

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for images, _ in calib.batches(batch_size):
            with contextlib.suppress(_StopForward):
                model(images.to(device))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(chunks)


@torch.no_grad()
def unit_outputs(model: nn.Module, unit: Unit, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([unit.output(model, inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
    model.train(was_training)
    return out


def output_error(model: nn.Module, unit: Unit, inputs: torch.Tensor, targets: torch.Tensor,
                 batch_size: int = 256) -> float:
    """Mean over samples (and positions) of the squared error summed over channels (msbench's loss)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            y = unit.output(model, inputs[i:i + batch_size])
            err = (y - targets[i:i + batch_size]).pow(2).sum(channel_dim(y))
            total += float(err.sum())
            count += err.numel()
    return total / max(count, 1)


# ------------------------------------------------------------------------------------ error correction


@torch.no_grad()
def correct_weights(dense_weight: torch.Tensor, mask: torch.Tensor, method: str = "msbench") -> torch.Tensor:
    """The masked weight after per-output-channel weight correction (`WEIGHT_CORRECTIONS`); zeros stay
    zero."""
    if method == "msbench":
        return msbench_weight_correction(dense_weight, mask)
    if method == "exact_moments":
        return exact_moment_correction(dense_weight, mask)
    if method == "none":
        return dense_weight.detach() * mask
    raise unknown_choice("algorithm.weight_correction", method, WEIGHT_CORRECTIONS)


@torch.no_grad()
def msbench_weight_correction(dense_weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """msbench's correction (`fake_sparse/sparse_base.py: DefaultFakeSparse.before_run`), in its arithmetic.

    Per output channel, over all its entries (zeros included), with torch's default unbiased std:
    scale = std(W) / (std(W * M) + 1e-9), shift = mean(W) - mean(W * M * scale); the weight becomes
    (W * scale + shift) * M, so the shift reaches the kept weights only. That makes it approximate (the
    channel's mean is not exactly the dense one), but a channel keeping a single weight keeps a weight of
    about the channel's spread instead of dying.
    """
    w = dense_weight.detach()
    axes = tuple(range(1, w.dim()))
    per_channel = (Ellipsis,) + (None,) * (w.dim() - 1)
    sparse = w * mask
    scale = (torch.std(w, dim=axes) / (torch.std(sparse, dim=axes) + 1e-9))[per_channel]
    shift = (torch.mean(w, dim=axes) - torch.mean(sparse * scale, dim=axes))[per_channel]
    return (w * scale + shift) * mask


@torch.no_grad()
def exact_moment_correction(dense_weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kept weights mapped to a * w + b per output channel so that the pruned channel, zeros included,
    has the dense channel's mean and standard deviation (zeros stay zero).

    With n weights per channel, k kept, kept mean m and variance v, and dense mean mu and second moment
    s2: a * m + b = mu * n / k fixes the mean and a^2 * v = (n / k) * s2 - (mu * n / k)^2 the second
    moment. Where that has no positive solution (a channel whose mean is large against its spread at
    high sparsity) only the mean is matched (a = 1). A channel keeping fewer than two weights is left as
    it is: with one weight the mean alone would turn it into the channel's sum, often about zero.
    """
    shape = dense_weight.shape
    w = dense_weight.detach().reshape(shape[0], -1).double()
    m = mask.detach().reshape(shape[0], -1).double()
    n = w.shape[1]
    k = m.sum(1)
    safe_k = k.clamp_min(1.0)
    mu, s2 = w.mean(1), w.pow(2).mean(1)
    kept_mean = (w * m).sum(1) / safe_k
    kept_var = ((w - kept_mean[:, None]).pow(2) * m).sum(1) / safe_k
    mean_target = mu * n / safe_k
    a2 = ((n / safe_k) * s2 - mean_target.pow(2)) / kept_var.clamp_min(1e-300)
    ok = (a2 > 0) & (kept_var > 0) & (k > 1)
    a = torch.where(ok, a2.clamp_min(0).sqrt(), torch.ones_like(a2))
    b = mean_target - a * kept_mean
    corrected = torch.where((k > 1)[:, None], a[:, None] * w + b[:, None], w) * m
    return corrected.to(dense_weight.dtype).reshape(shape)


@torch.no_grad()
def correct_bias(model: nn.Module, unit: Unit, inputs: torch.Tensor, targets: torch.Tensor,
                 batch_size: int = 256) -> float | None:
    """Add the unit's mean output error per channel to its bias; returns the mean |shift| (None: no bias)."""
    bias = unit.bias(model)
    if bias is None:
        return None
    total = torch.zeros_like(bias, dtype=torch.float64)
    count = 0
    for i in range(0, len(inputs), batch_size):
        y = unit.output(model, inputs[i:i + batch_size])
        diff = targets[i:i + batch_size] - y
        dim = channel_dim(y) % y.dim()
        other = [d for d in range(y.dim()) if d != dim]
        total += diff.double().sum(dim=other)
        count += diff.numel() // diff.shape[dim]
    shift = (total / max(count, 1)).to(bias.dtype)
    bias.add_(shift)
    return float(shift.abs().mean())


# ----------------------------------------------------------------------------------------- reconstruction


def unit_parameters(model: nn.Module, unit: Unit) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, biases and normalisation parameters) that reconstruction tunes for a unit.

    A masked weight's trainable tensor is its parametrization's `original` (what `parameters()` yields);
    W * M keeps the pruned entries at zero whatever the optimiser does to them.
    """
    params = list(unit.module(model).parameters())
    carried = unit.bias(model) if unit.carrier is not None else None
    if carried is not None:
        params.append(carried)
    seen: set[int] = set()
    unique = [p for p in params if not (id(p) in seen or seen.add(id(p)))]
    return [p for p in unique if p.dim() > 1], [p for p in unique if p.dim() <= 1]


@dataclass
class UnitReport:
    unit: str
    kind: str
    error_before: float
    error_after: float
    steps: int
    bias_shift: float | None = None
    reverted: bool = False  # tuning made the unit worse on the calibration set, so it was undone


def summarise(reports: list[UnitReport]) -> tuple[pd.DataFrame, dict[str, float | int]]:
    """The per-unit table a method saves (`reconstruction.csv`) and the stats it records (empty if none)."""
    table = pd.DataFrame([vars(r) for r in reports])
    if table.empty:
        return table, {}
    return table, {"units": len(table), "mean_error_before": float(table["error_before"].mean()),
                   "mean_error_after": float(table["error_after"].mean()),
                   "recon_steps": int(table["steps"].sum())}


class SquaredError(torch.autograd.Function):
    """(y - t)^2 with the gradient 2 (y - t) g of `(y - t).pow(2)`, bit for bit (pow(d, 2) is d * d, and
    doubling is exact), in two passes instead of pow's three (it copies d.pow(1) first); t gets no
    gradient."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = y - target
        ctx.save_for_backward(diff)
        return diff * diff

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (diff,) = ctx.saved_tensors
        return torch.mul(grad, diff).mul_(2.0), None


def adam(groups: list[dict]) -> torch.optim.Adam:
    """Adam, with the fused kernel where every parameter allows it (floating point on CPU or CUDA): the
    same update in one pass per tensor instead of about ten separate ones, which on CPU took ~50 ms a
    step for a 2.4M-weight conv against ~2 ms fused (rounding may differ in the last bits)."""
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(groups, fused=True if fused else None)


def tune_unit(model: nn.Module, unit: Unit, inputs: torch.Tensor, targets: torch.Tensor,
              settings: ReconstructionSettings, generator: torch.Generator) -> int:
    """Adam on the unit's parameters against the dense outputs; returns the number of steps taken."""
    weights, biases = unit_parameters(model, unit)
    groups = [g for g in ({"params": weights, "lr": settings.lr}, {"params": biases, "lr": settings.bias_lr})
              if g["params"]]
    if not groups or settings.iterations == 0:
        return 0
    flags = [p.requires_grad for g in groups for p in g["params"]]
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    optimizer = adam(groups)
    was_training = model.training
    model.eval()  # BatchNorm inside a block normalises with its running statistics, which stay fixed
    steps = 0
    try:
        with torch.enable_grad():
            for step in range(settings.iterations):
                idx = torch.randint(len(inputs), (min(settings.batch_size, len(inputs)),),
                                    generator=generator)
                idx = idx.to(inputs.device)
                # index_select: the same rows as inputs[idx], copied about 4x faster than advanced indexing
                y = unit.output(model, inputs.index_select(0, idx))
                loss = SquaredError.apply(y, targets.index_select(0, idx)).sum(channel_dim(y)).mean()
                ensure_finite(loss.item(), f"reconstruction loss of {unit.name}", step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps = step + 1
                if loss.item() < settings.early_stop_loss:
                    break
    finally:
        model.train(was_training)
        for p, flag in zip((p for g in groups for p in g["params"]), flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
    return steps


def process_units(student: nn.Module, teacher: nn.Module, units: list[Unit], calib: CalibrationSet,
                  settings: ReconstructionSettings, device: torch.device, generator: torch.Generator,
                  bias_correction: bool = False, progress: bool = False, desc: str = "reconstruction"
                  ) -> list[UnitReport]:
    """For each unit in order: collect its inputs (dense or sparse) and the dense unit's outputs on the
    dense inputs, optionally correct its bias, then tune it (`settings.iterations` Adam steps).

    Units are processed front to back, so with sparse inputs each unit sees the activations of the
    already corrected units before it.
    """
    reports = []
    bar = tqdm(units, desc=desc, disable=not progress, leave=False)
    for unit in bar:
        dense_in = collect_inputs(teacher, unit.name, calib, settings.batch_size, device)
        targets = unit_outputs(teacher, unit, dense_in)
        inputs = dense_in if settings.inputs == "dense" else collect_inputs(student, unit.name, calib,
                                                                            settings.batch_size, device)
        del dense_in
        before = output_error(student, unit, inputs, targets)
        shift = correct_bias(student, unit, inputs, targets) if bias_correction else None
        steps, reverted, after = 0, False, output_error(student, unit, inputs, targets)
        if settings.mode != "none":
            weights, biases = unit_parameters(student, unit)
            saved = [p.detach().clone() for p in weights + biases]
            steps = tune_unit(student, unit, inputs, targets, settings, generator)
            tuned = output_error(student, unit, inputs, targets)
            if tuned > after:  # a too-large step size can overshoot on a unit whose error is already tiny
                with torch.no_grad():
                    for p, value in zip(weights + biases, saved, strict=True):
                        p.copy_(value)
                reverted = True
            else:
                after = tuned
        reports.append(UnitReport(unit.name, unit.kind, before, after, steps, shift, reverted))
        bar.set_postfix(unit=unit.name, before=f"{before:.3g}", after=f"{after:.3g}", refresh=False)
    bar.close()
    return reports
