"""The allocation axis as methods use it: which strategy splits the target across layers (the registry of
`ptsbench.sparsity.ALLOCATIONS`, OWL's calibrated rates, or another job's per-layer file), checked up front
and turned into exact per-layer zero counts; and the N:M masks of a pattern from any per-weight score."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ptsbench.errors import ConfigError, PtsbenchError, unknown_choice
from ptsbench.owl import OWLSettings, owl_counts
from ptsbench.patterns import Pattern, nm_mask, nm_zero_counts
from ptsbench.sparsity import (
    ALLOCATIONS,
    TARGET_SLACK_PER_LAYER,
    PrunableLayer,
    allocate,
    counts_from_rates,
    magnitude_mask,
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
    def read(cls, strategy: str, erk_power_scale: float = 1.0, file: str | None = None,
             label: str | None = None,
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
            raise ConfigError("algorithm.allocation=from_file needs algorithm.allocation_file=PATH "
                              "(an allocation.csv).")
        return self

    @property
    def needs_calibration(self) -> bool:
        """True when `counts` needs the layers' dense input norms (`ptsbench.layerwise.dense_input_norms`)."""
        return self.strategy in CALIBRATED_ALLOCATIONS

    def validate(self, layers: list[PrunableLayer], target: float, pattern: Pattern) -> None:
        if pattern.is_nm and self.strategy != "uniform":
            raise ConfigError(f"algorithm.allocation={self.strategy} cannot be combined with "
                              f"pattern={pattern}: N:M fixes every layer's sparsity at 1 - N/M = "
                              f"{pattern.sparsity:.4g}, so there is nothing to allocate. Use "
                              "algorithm.allocation=uniform (or pattern=unstructured).")
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
        return (self.strategy if self.strategy != "erk" or self.erk_power_scale == 1.0
                else f"erk{self.erk_power_scale:g}")


def pattern_masks(layers: list[PrunableLayer], counts: dict[str, int], pattern: Pattern,
                  scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks from per-layer scores: exact lowest-score counts (unstructured) or N:M groups where rows fit."""
    if not pattern.is_nm:
        return {ly.name: magnitude_mask(ly.weight, counts[ly.name], scores[ly.name]) for ly in layers}
    return {ly.name: nm_mask(scores[ly.name], pattern.n, pattern.m) if pattern.fits(ly)
            else magnitude_mask(ly.weight, 0) for ly in layers}
