"""Magnitude PTS: split the global target across layers (an allocation), then remove each layer's
smallest-magnitude weights, optionally re-estimating BatchNorm statistics on the calibration set.

This is the baseline every PTS paper starts from; with `allocation=global_l2norm` it is POT's mask
selection without POT's corrections. `reconstruction=layer|block` adds PTSBench's reconstruction axis
(`ptsbench.reconstruct`): each layer or block is tuned to reproduce the dense one's output, so any
allocation (including another job's, `allocation=from_file`) can be combined with any reconstruction.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm
from ptsbench.bn import recalibrate_batchnorm
from ptsbench.errors import ConfigError, unknown_choice
from ptsbench.reconstruct import ReconstructionSettings, make_units, process_units, summarise
from ptsbench.sparsity import (
    ALLOCATIONS,
    PrunableLayer,
    allocate,
    apply_masks,
    bake_masks,
    counts_from_rates,
    magnitude_masks,
    rates,
)

ALLOCATION_CHOICES = ALLOCATIONS + ("from_file",)
RNG_STREAM = 31  # ctx.generator offset for the reconstruction batches


def read_allocation_file(path: str | Path, layers: list[PrunableLayer], target: float,
                         tolerance: float = 5e-3) -> dict[str, float]:
    """Per-layer sparsities from another job's allocation.csv (its audited `achieved_sparsity` column)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"algorithm.allocation_file={str(path)!r} does not exist.")
    table = pd.read_csv(path)
    column = "achieved_sparsity" if "achieved_sparsity" in table else "target_sparsity"
    if "name" not in table or column not in table:
        raise ConfigError(f"{path} has no 'name' and 'achieved_sparsity' columns (an allocation.csv from a job).")
    given = dict(zip(table["name"], table[column], strict=True))
    names = {ly.name for ly in layers}
    unknown = sorted(set(given) - names)
    missing = sorted(names - set(given))
    if unknown or missing:
        raise ConfigError(
            f"Allocation file {path} does not fit this model: layers the model does not have: "
            f"{unknown[:8] or 'none'}; model layers the file lacks: {missing[:8] or 'none'}."
        )
    layer_rates = {name: float(given[name]) for name in names}
    bad = {name: v for name, v in layer_rates.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ConfigError(f"Allocation file {path} has layer sparsities outside [0, 1]: {dict(list(bad.items())[:5])}.")
    total = sum(ly.numel for ly in layers)
    reached = sum(layer_rates[ly.name] * ly.numel for ly in layers) / total
    if abs(reached - target) > tolerance:
        raise ConfigError(
            f"Allocation file {path} gives global sparsity {reached:.4f}, not the target {target} "
            f"(tolerance {tolerance}). Use the file with sparsity={reached:.4f} or pick another file."
        )
    return layer_rates


class MagnitudePruning(PTSAlgorithm):
    name = "magnitude"

    def __init__(self, allocation: str = "uniform", erk_power_scale: float = 1.0, allocation_file: str | None = None,
                 allocation_label: str | None = None,
                 bn_recalibration: bool = False, bn_batch_size: int = 64, reconstruction: str = "none",
                 recon_inputs: str = "dense", recon_iterations: int = 20_000, recon_lr: float = 1e-5,
                 recon_bias_lr: float = 1e-4, recon_batch_size: int = 64, early_stop_loss: float = 1e-5):
        if allocation not in ALLOCATION_CHOICES:
            raise unknown_choice("allocation", allocation, ALLOCATION_CHOICES)
        if allocation == "from_file" and not allocation_file:
            raise ConfigError("algorithm.allocation=from_file needs algorithm.allocation_file=PATH (an allocation.csv).")
        self.allocation = allocation
        self.erk_power_scale = float(erk_power_scale)
        self.allocation_file = allocation_file
        self.allocation_label = allocation_label  # names a from_file allocation in labels, e.g. "fcpts"
        self.bn_recalibration = bool(bn_recalibration)
        self.bn_batch_size = int(bn_batch_size)
        self.recon = ReconstructionSettings(reconstruction, recon_inputs, int(recon_iterations), float(recon_lr),
                                            float(recon_bias_lr), int(recon_batch_size),
                                            float(early_stop_loss)).check()

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"allocation": self.allocation, "bn_recalibration": self.bn_recalibration}
        if self.allocation == "erk":
            opts["erk_power_scale"] = self.erk_power_scale
        if self.allocation == "from_file":
            opts["allocation_file"] = str(self.allocation_file)
            if self.allocation_label:
                opts["allocation_label"] = self.allocation_label
        if self.recon.mode != "none":
            opts.update(reconstruction=self.recon.mode, recon_inputs=self.recon.inputs,
                        recon_iterations=self.recon.iterations, recon_lr=self.recon.lr,
                        recon_bias_lr=self.recon.bias_lr)
        return opts

    @property
    def label(self) -> str:
        alloc = self.allocation if self.allocation != "erk" or self.erk_power_scale == 1.0 else f"erk{self.erk_power_scale:g}"
        if self.allocation == "from_file" and self.allocation_label:
            alloc = f"from_{self.allocation_label}"
        label = f"magnitude-{alloc}" + ("+bn" if self.bn_recalibration else "")
        if self.recon.mode != "none":
            label += f"+{self.recon.mode}" + ("-sparseinp" if self.recon.inputs == "sparse" else "")
        return label

    def validate(self, layers: list[PrunableLayer], target: float) -> None:
        if self.allocation == "from_file":
            read_allocation_file(self.allocation_file, layers, target)

    def prune(self, model: nn.Module, layers: list[PrunableLayer], target: float, ctx: PruneContext) -> PruneResult:
        # 1. Allocation: how many weights each layer loses.
        if self.allocation == "from_file":
            counts = counts_from_rates(layers, read_allocation_file(self.allocation_file, layers, target))
        else:
            counts = allocate(layers, target, self.allocation, self.erk_power_scale)
        # 2. Masks: the smallest magnitudes of each layer.
        dense = copy.deepcopy(model).requires_grad_(False) if self.recon.mode != "none" else None
        masks = magnitude_masks(layers, counts)
        apply_masks(layers, masks)
        stats: dict[str, Any] = {}
        tables = {}
        # 3. Optional reconstruction of each layer's or block's dense output.
        if dense is not None:
            reports = process_units(model, dense, make_units(self.recon.mode, model, layers), ctx.calib,
                                    self.recon, ctx.device, ctx.generator(RNG_STREAM), progress=ctx.progress,
                                    desc=f"{self.recon.mode}-wise reconstruction")
            tables["reconstruction"], recon_stats = summarise(reports)
            stats.update(recon_stats)
        # 4. Optional BatchNorm re-estimation on the calibration images, last: reconstruction brings each
        # layer's output back towards the dense one, so statistics measured before it would no longer fit
        # (measured: uniform 0.9 on resnet18 fell from 37.7% to 10.1% with layer reconstruction after BN).
        bn_layers = 0
        if self.bn_recalibration:
            bn_layers = recalibrate_batchnorm(model, ctx.calib, ctx.device, self.bn_batch_size)
        stats.update(bn_layers_recalibrated=bn_layers, calib_passes=int(self.bn_recalibration))
        bake_masks(model)
        return PruneResult(model=model, allocation=rates(layers, counts), masks=masks, stats=stats, tables=tables)
