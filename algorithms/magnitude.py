"""Magnitude PTS: split the global target across layers (an allocation), then remove each layer's
smallest-magnitude weights, optionally re-estimating BatchNorm statistics on the calibration set.

This is the baseline every PTS paper starts from; with `allocation=global_l2norm` it is POT's mask
selection without POT's corrections. With `pattern=N:M` (top-level key) every row of a layer keeps the N
largest |w| of each M consecutive weights (`ptsbench.patterns`), and the allocation is the pattern's. `reconstruction=layer|block` adds PTSBench's reconstruction axis
(`ptsbench.reconstruct`): each layer or block is tuned to reproduce the dense one's output, so any
allocation (including another job's, `allocation=from_file`) can be combined with any reconstruction.
`allocation=owl` takes OWL's rates from the dense network's Wanda scores (`ptsbench.owl`), as the OWL
code's magnitude variant, and `refine=dsnot` moves each layer's mask with DSnoT (`algorithms.dsnot`)
on calibration statistics gathered under `calib_protocol`, as the DSnoT code's magnitude start.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm
from algorithms.dsnot import DSnoTSettings, read_refinement, refine_masks
from ptsbench.bn import recalibrate_batchnorm
from ptsbench.errors import ConfigError, PtsbenchError, unknown_choice
from ptsbench.layerwise import CALIB_PROTOCOLS, dense_input_norms
from ptsbench.owl import OWLSettings, owl_counts
from ptsbench.patterns import Pattern, nm_mask, nm_zero_counts
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
    ALLOCATIONS,
    TARGET_SLACK_PER_LAYER,
    PrunableLayer,
    allocate,
    apply_masks,
    bake_masks,
    counts_from_rates,
    magnitude_mask,
    rates,
)

# Allocations that read calibration statistics, not the weights alone: each layer's Wanda input norms
# from the dense network (`ptsbench.layerwise.dense_input_norms`).
CALIBRATED_ALLOCATIONS = ("owl",)
ALLOCATION_CHOICES = ALLOCATIONS + CALIBRATED_ALLOCATIONS + ("from_file",)


def read_allocation_file(path: str | Path, layers: list[PrunableLayer], target: float) -> dict[str, float]:
    """Per-layer sparsities from another job's allocation.csv (its audited `achieved_sparsity` column).

    Checked before any work as strictly as the final audit checks the job: one row per model layer, each a
    number in [0, 1], and the zeros they give within one weight per layer of target x weights.
    """
    key = f"algorithm.allocation_file={str(path)!r}"
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"{key} {what}; give the allocation.csv of a job.")
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ConfigError(f"{key} is empty; give the allocation.csv of a job (a row per layer).") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:160]
        raise ConfigError(f"{key} is not a CSV table ({type(exc).__name__}: {reason}); give the "
                          "allocation.csv of a job.") from None
    column = "achieved_sparsity" if "achieved_sparsity" in table else "target_sparsity"
    if "name" not in table or column not in table:
        found = ", ".join(map(str, table.columns[:8])) or "none"
        raise ConfigError(f"{key} has no 'name' and 'achieved_sparsity' columns (found: {found}); give the "
                          "allocation.csv of a job.")

    def rows(where: pd.Series) -> str:  # the header is line 1
        found = [f"line {i + 2} ({table.at[i, 'name']!r}: {table.at[i, column]!r})"
                 for i in table.index[where]]
        return ", ".join(found[:5]) + (f" ... ({len(found)} rows in all)" if len(found) > 5 else "")

    repeated = table["name"].duplicated(keep=False)
    if repeated.any():
        raise ConfigError(f"{key} lists a layer more than once: {rows(repeated)}. One row per layer, please.")
    values = pd.to_numeric(table[column], errors="coerce")
    outside = values.isna() | (values < 0) | (values > 1)
    if outside.any():
        raise ConfigError(f"{key}: column {column!r} must hold a sparsity in [0, 1] in every row; it "
                          f"does not in {rows(outside)}.")
    given = dict(zip(table["name"], values, strict=True))
    names = {ly.name for ly in layers}
    unknown = sorted(map(str, set(given) - names))
    missing = sorted(names - set(given))
    if unknown or missing:
        raise ConfigError(
            f"{key} does not fit this model: layers the model does not have: {unknown[:8] or 'none'}; model "
            f"layers the file lacks: {missing[:8] or 'none'}."
        )
    layer_rates = {name: float(given[name]) for name in names}
    total = sum(ly.numel for ly in layers)
    zeros = sum(counts_from_rates(layers, layer_rates).values())
    slack = TARGET_SLACK_PER_LAYER * len(layers)
    if abs(zeros - target * total) > slack:
        raise ConfigError(
            f"{key} gives global sparsity {zeros / total:.8g} ({zeros} of {total} weights), "
            f"{abs(zeros - target * total):.0f} weights from the target sparsity={target}; the audit allows "
            f"{slack} (one per layer), so the job would end target_missed. Use the file with "
            f"sparsity={zeros / total:.8g}, or pick another file."
        )
    return layer_rates


@dataclass(frozen=True)
class AllocationChoice:
    """The allocation axis as a method's options: a registered strategy, or another job's allocation.csv.

    Shared by every method that takes its per-layer rates from outside (magnitude, Wanda, SparseGPT).
    """

    strategy: str = "uniform"
    erk_power_scale: float = 1.0
    file: str | None = None
    label: str | None = None  # names a from_file allocation in method labels, e.g. "fcpts"
    owl: OWLSettings | None = None  # OWL's M and lambda, with strategy owl

    @classmethod
    def read(cls, strategy: str, erk_power_scale: float = 1.0, file: str | None = None, label: str | None = None,
             owl: OWLSettings | Mapping[str, Any] | None = None) -> AllocationChoice:
        """The choice from a method's constructor arguments, checked; `owl` (algorithm.owl) only with owl."""
        if owl is not None and strategy != "owl":
            raise ConfigError(f"algorithm.owl sets OWL's M and lambda, but algorithm.allocation={strategy}; "
                              "use algorithm.allocation=owl or drop algorithm.owl.")
        settings = OWLSettings.read(owl, "algorithm.owl") if strategy == "owl" else None
        return cls(strategy, float(erk_power_scale), file, label, settings).check()

    def check(self) -> AllocationChoice:
        if self.strategy not in ALLOCATION_CHOICES:
            raise unknown_choice("allocation", self.strategy, ALLOCATION_CHOICES)
        if self.strategy == "from_file" and not self.file:
            raise ConfigError("algorithm.allocation=from_file needs algorithm.allocation_file=PATH (an allocation.csv).")
        return self

    @property
    def needs_calibration(self) -> bool:
        """True when `counts` needs the layers' dense input norms (`ptsbench.layerwise.dense_input_norms`)."""
        return self.strategy in CALIBRATED_ALLOCATIONS

    def validate(self, layers: list[PrunableLayer], target: float, pattern: Pattern) -> None:
        if pattern.is_nm and self.strategy != "uniform":
            raise ConfigError(f"algorithm.allocation={self.strategy} cannot be combined with pattern={pattern}: N:M "
                              f"fixes every layer's sparsity at 1 - N/M = {pattern.sparsity:.4g}, so there is nothing "
                              "to allocate. Use algorithm.allocation=uniform (or pattern=unstructured).")
        if self.strategy == "from_file":
            read_allocation_file(self.file, layers, target)

    def counts(self, layers: list[PrunableLayer], target: float, pattern: Pattern,
               input_norms: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
        """Zeros per layer: the pattern's where it fixes them, else the strategy's (exact counts).
        `input_norms` (squared, per layer) feed the calibrated allocations."""
        if pattern.is_nm:
            return nm_zero_counts(layers, pattern)
        if self.strategy == "from_file":
            return counts_from_rates(layers, read_allocation_file(self.file, layers, target))
        if self.strategy == "owl":
            if input_norms is None:
                raise PtsbenchError("allocation=owl needs the layers' dense input norms (dense_input_norms).")
            return owl_counts(layers, target, input_norms, self.owl or OWLSettings())
        return allocate(layers, target, self.strategy, self.erk_power_scale)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"allocation": self.strategy}
        if self.strategy == "erk":
            opts["erk_power_scale"] = self.erk_power_scale
        if self.strategy == "from_file":
            opts["allocation_file"] = str(self.file)
            if self.label:
                opts["allocation_label"] = self.label
        if self.owl is not None:
            opts.update(owl_m=self.owl.m, owl_lambda=self.owl.lam)
        return opts

    def describe(self, pattern: Pattern) -> str:
        """The allocation's part of a method label; under N:M the pattern names it."""
        if pattern.is_nm:
            return str(pattern)
        if self.strategy == "from_file" and self.label:
            return f"from_{self.label}"
        if self.owl is not None and self.owl != OWLSettings():
            return f"owl-m{self.owl.m:g}-l{self.owl.lam:g}"
        return self.strategy if self.strategy != "erk" or self.erk_power_scale == 1.0 else f"erk{self.erk_power_scale:g}"


def pattern_masks(layers: list[PrunableLayer], counts: dict[str, int], pattern: Pattern,
                  scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks from per-layer scores: exact lowest-score counts (unstructured) or N:M groups where rows fit."""
    if not pattern.is_nm:
        return {ly.name: magnitude_mask(ly.weight, counts[ly.name], scores[ly.name]) for ly in layers}
    return {ly.name: nm_mask(scores[ly.name], pattern.n, pattern.m) if pattern.fits(ly)
            else magnitude_mask(ly.weight, 0) for ly in layers}


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
            masks, refine_stats = refine_masks(model, layers, masks, ctx, self.calib_protocol, self.bn_batch_size,
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
