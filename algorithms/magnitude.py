"""Magnitude PTS: split the global target across layers (an allocation), then remove each layer's
smallest-magnitude weights, optionally re-estimating BatchNorm statistics on the calibration set.

This is the baseline every PTS paper starts from; with `allocation=global_l2norm` it is POT's mask
selection without POT's corrections. With `pattern=N:M` (top-level key) every row of a layer keeps the N
largest |w| of each M consecutive weights (`ptsbench.patterns`), and the allocation is the pattern's. `reconstruction=layer|block` adds PTSBench's reconstruction axis
(`ptsbench.reconstruct`): each layer or block is tuned to reproduce the dense one's output, so any
allocation (including another job's, `allocation=from_file`) can be combined with any reconstruction.
`allocation=owl` takes OWL's rates from the dense network's Wanda scores (`ptsbench.owl`), as the OWL
code's magnitude variant, and `refine=dsnot` moves each layer's mask with DSnoT (`ptsbench.dsnot`)
on calibration statistics gathered under `calib_protocol`, as the DSnoT code's magnitude start.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm
from ptsbench.allocation import AllocationChoice, pattern_masks
from ptsbench.bn import recalibrate_batchnorm
from ptsbench.dsnot import DSnoTSettings, read_refinement, refine_masks
from ptsbench.errors import ConfigError, unknown_choice
from ptsbench.layerwise import CALIB_PROTOCOLS, dense_input_norms
from ptsbench.owl import OWLSettings
from ptsbench.reconstruct import (
    RECONSTRUCTION_STREAM,
    REFERENCE_STEPS,
    ReconstructionSettings,
    make_units,
    process_units,
    reconstruction_budget,
    summarise,
)
from ptsbench.settings import COUNT, count_text, read_budget, scaled
from ptsbench.sparsity import (
    PrunableLayer,
    apply_masks,
    bake_masks,
    rates,
)


class MagnitudePruning(PTSAlgorithm):
    name = "magnitude"
    supports_nm_pattern = True

    def __init__(self, allocation: str = "uniform", erk_power_scale: float = 1.0, allocation_file: str | None = None,
                 allocation_label: str | None = None, bn_recalibration: bool = False, bn_batch_size: int = 64,
                 reconstruction: ReconstructionSettings | Mapping[str, Any] | None = None, budget: float | str = 1.0,
                 owl: OWLSettings | Mapping[str, Any] | None = None, refine: str = "none",
                 dsnot: DSnoTSettings | Mapping[str, Any] | None = None, calib_protocol: str | None = None):
        self.alloc = AllocationChoice.read(allocation, erk_power_scale, allocation_file, allocation_label, owl)
        self.bn_recalibration = bool(bn_recalibration)
        self.bn_batch_size = int(bn_batch_size)
        COUNT.check("algorithm.bn_batch_size", self.bn_batch_size)
        self.budget_scale = read_budget(budget)
        recon = ReconstructionSettings.read(reconstruction, "algorithm.reconstruction")
        self.recon = recon.replace(iterations=scaled(recon.iterations, self.budget_scale, minimum=0))
        self.dsnot = read_refinement(refine, dsnot)
        self.calib_protocol = self.default_protocol() if calib_protocol is None else str(calib_protocol)
        if self.dsnot is None and calib_protocol is not None:
            raise ConfigError("algorithm.calib_protocol says where DSnoT's statistics come from; magnitude masks "
                              "need no calibration. Use it with algorithm.refine=dsnot, or drop it.")
        if self.calib_protocol not in CALIB_PROTOCOLS:
            raise unknown_choice("algorithm.calib_protocol", self.calib_protocol, CALIB_PROTOCOLS)
        if self.calib_protocol == "sequential+bn" and not self.bn_recalibration:
            raise ConfigError("algorithm.calib_protocol=sequential+bn re-estimates BatchNorm along the sequential "
                              "pass and needs algorithm.bn_recalibration=true.")

    def default_protocol(self) -> str:
        # DSnoT's reference refines each block on the pruned prefix; BN networks re-estimate BN along it
        return "sequential+bn" if self.bn_recalibration else "sequential"

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {**self.alloc.options(), "bn_recalibration": self.bn_recalibration}
        if self.recon.mode != "none":
            opts.update(self.recon.options(), budget=reconstruction_budget(self.recon))
        if self.dsnot is not None:
            opts.update(refine="dsnot", **self.dsnot.options(), calib_protocol=self.calib_protocol)
        return opts

    @property
    def budget_fraction(self) -> float | None:
        return self.recon.iterations / REFERENCE_STEPS if self.recon.mode != "none" else None

    def budget_work(self) -> str | None:
        if self.recon.mode == "none":
            return None
        steps = count_text(self.recon.iterations)
        return f"{steps} reconstruction steps per {self.recon.mode} (reference: {REFERENCE_STEPS:,})"

    def budget_tags(self) -> list[str]:
        return [f"x{self.budget_scale:g}"] if self.recon.mode != "none" and self.budget_scale != 1.0 else []

    @property
    def family(self) -> str:
        method = "magnitude" if self.dsnot is None else "magnitude+dsnot"
        tags = {"dense": "-dense", "sequential": "-seq", "sequential+bn": "-seqbn"}
        protocol = "" if self.calib_protocol == self.default_protocol() else tags[self.calib_protocol]
        label = f"{method}-{self.alloc.describe(self.pattern)}{protocol}{'+bn' if self.bn_recalibration else ''}"
        if self.recon.mode != "none":
            label += f"+{self.recon.mode}" + ("-sparseinp" if self.recon.inputs == "sparse" else "")
        return label

    def validate(self, layers: list[PrunableLayer], target: float) -> None:
        self.alloc.validate(layers, target, self.pattern)

    def prune(self, model: nn.Module, layers: list[PrunableLayer], target: float, ctx: PruneContext) -> PruneResult:
        # 1. Allocation: how many weights each layer loses (fixed by the pattern under N:M); OWL's from the
        # dense network's Wanda scores, one calibration pass.
        owl_pass = self.alloc.needs_calibration
        norms = dense_input_norms(model, layers, ctx.calib, self.bn_batch_size) if owl_pass else None
        counts = self.alloc.counts(layers, target, self.pattern, norms)
        # 2. Masks: the smallest magnitudes of each layer (of each group of M under N:M).
        dense = copy.deepcopy(model).requires_grad_(False) if self.recon.mode != "none" else None
        masks = pattern_masks(layers, counts, self.pattern, {ly.name: ly.weight.detach().abs() for ly in layers})
        stats: dict[str, Any] = {}
        passes = int(owl_pass)
        # 2b. Optional DSnoT: swaps within rows towards each layer's mean output, on calibration statistics.
        if self.dsnot is not None:
            masks, refine_stats = refine_masks(model, layers, masks, ctx.calib, ctx.device, ctx.progress,
                                               self.calib_protocol, self.bn_batch_size,
                                               self.pattern, self.dsnot)
            passes += refine_stats.pop("calib_passes")
            stats.update(refine_stats)
        apply_masks(layers, masks)
        tables = {}
        # 3. Optional reconstruction of each layer's or block's dense output.
        if dense is not None:
            reports = process_units(model, dense, make_units(self.recon.mode, model, layers), ctx.calib,
                                    self.recon, ctx.device, ctx.generator(RECONSTRUCTION_STREAM), progress=ctx.progress,
                                    desc=f"{self.recon.mode}-wise reconstruction")
            tables["reconstruction"], recon_stats = summarise(reports)
            stats.update(recon_stats)
        # 4. Optional BatchNorm re-estimation on the calibration images, last: reconstruction brings each
        # layer's output back towards the dense one, so statistics taken before it would no longer fit
        # (results/README.md, "Measurements behind the defaults").
        bn_layers = 0
        if self.bn_recalibration:
            bn_layers = recalibrate_batchnorm(model, ctx.calib, ctx.device, self.bn_batch_size)
        stats.update(bn_layers_recalibrated=bn_layers, calib_passes=passes + int(self.bn_recalibration))
        bake_masks(model)
        return PruneResult(model=model, allocation=rates(layers, counts), masks=masks, stats=stats, tables=tables)
