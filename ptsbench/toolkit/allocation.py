"""The allocation axis as methods use it: which strategy splits the target across layers (one of the registry
`ptsbench.toolkit.allocations`, OWL's calibrated rates among them, or another job's per-layer file), checked
up front and turned into exact per-layer zero counts; and the N:M masks of a pattern from any per-weight
score."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ptsbench.errors import ConfigError
from ptsbench.settings import POSITIVE, Settings, node, option
from ptsbench.toolkit.allocations import FROM_FILE, Allocation, available_allocations, get_allocation
from ptsbench.toolkit.owl import OWLSettings
from ptsbench.toolkit.patterns import Pattern, nm_mask, nm_zero_counts
from ptsbench.toolkit.sparsity import (
    TARGET_SLACK_PER_LAYER,
    PrunableLayer,
    counts_from_rates,
    magnitude_mask,
)

# The one allocation configured through a node of its own (`algorithm.owl`: OWLSettings, with its checks),
# kept as the methods' constructor argument so the shipped configs keep their keys and hashes.
OWL = "owl"


@dataclass(frozen=True)
class AllocationSettings(Settings):
    """The allocation keys of every method that takes its per-layer rates from the axis (magnitude, random,
    Wanda, SparseGPT, RIA): a method's settings dataclass inherits them."""

    allocation: str = "uniform"  # a registered allocation (ptsbench.toolkit.allocations) or from_file
    erk_power_scale: float = option(1.0, POSITIVE)  # ERK density ~ (sum dims / prod dims) ** power_scale
    allocation_file: str | None = None  # an allocation.csv from another job, with allocation=from_file
    allocation_label: str | None = None  # names that allocation in method labels (e.g. fcpts)
    owl: OWLSettings | None = node(OWLSettings, optional=True)  # OWL's M and lambda, with allocation=owl

    def allocation_choice(self) -> AllocationChoice:
        return AllocationChoice.read(self.allocation, self.erk_power_scale, self.allocation_file,
                                     self.allocation_label, self.owl)

    def check_together(self, key: str) -> None:
        self.allocation_choice()  # an unknown name, from_file without a file, owl's node without owl
        super().check_together(key)


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
    `from_file` stays here rather than in the registry: it is no function of the layers and the target but a
    replay of a job's output, with keys of its own (a path, a label naming its source), a check of the file
    against the model before any work, and counts held to the file's rates rather than re-rounded to the
    target.
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
        if owl is not None and strategy != OWL:
            raise ConfigError(f"algorithm.owl sets OWL's M and lambda, but algorithm.allocation={strategy}; "
                              "use algorithm.allocation=owl or drop algorithm.owl.")
        settings = OWLSettings.read(owl, "algorithm.owl") if strategy == OWL else None
        return cls(strategy, float(erk_power_scale), file, label, settings).check()

    def check(self) -> AllocationChoice:
        if self.strategy != FROM_FILE:
            get_allocation(self.strategy)  # an unknown name fails here, listing the registry and from_file
        elif not self.file:
            raise ConfigError("algorithm.allocation=from_file needs algorithm.allocation_file=PATH "
                              "(an allocation.csv).")
        return self

    @property
    def allocation(self) -> Allocation | None:
        """The registered allocation; None for from_file."""
        return None if self.strategy == FROM_FILE else available_allocations()[self.strategy]

    @property
    def settings(self) -> dict[str, Any]:
        """The registered allocation's options from the method's arguments (none for from_file)."""
        given: dict[str, Any] = {"erk_power_scale": self.erk_power_scale}
        if self.owl is not None:
            given.update(owl_m=self.owl.m, owl_lambda=self.owl.lam)
        allocation = self.allocation
        return {} if allocation is None else allocation.settings(given)

    @property
    def needs_calibration(self) -> bool:
        """True when `counts` needs the layers' dense input norms
        (`ptsbench.toolkit.layerwise.dense_input_norms`)."""
        allocation = self.allocation
        return allocation is not None and allocation.needs_calibration

    def validate(self, layers: list[PrunableLayer], target: float, pattern: Pattern) -> None:
        if pattern.is_nm and self.strategy != "uniform":
            raise ConfigError(f"algorithm.allocation={self.strategy} cannot be combined with "
                              f"pattern={pattern}: N:M fixes every layer's sparsity at 1 - N/M = "
                              f"{pattern.sparsity:.4g}, so there is nothing to allocate. Use "
                              "algorithm.allocation=uniform (or pattern=unstructured).")
        if self.strategy == FROM_FILE:
            read_allocation_file(self.file, layers, target)

    def counts(self, layers: list[PrunableLayer], target: float, pattern: Pattern,
               input_norms: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
        """Zeros per layer: the pattern's where it fixes them, else the strategy's (exact counts).
        `input_norms` (squared, per layer) feed the calibrated allocations."""
        if pattern.is_nm:
            return nm_zero_counts(layers, pattern)
        allocation = self.allocation
        if allocation is None:
            return counts_from_rates(layers, read_allocation_file(self.file, layers, target))
        return allocation(layers, target, input_norms, self.settings)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"allocation": self.strategy, **self.settings}
        if self.strategy == FROM_FILE:
            opts["allocation_file"] = str(self.file)
            if self.label:
                opts["allocation_label"] = self.label
        return opts

    def describe(self, pattern: Pattern) -> str:
        """The allocation's part of a method label; under N:M the pattern names it."""
        if pattern.is_nm:
            return str(pattern)
        allocation = self.allocation
        if allocation is None:
            return f"from_{self.label}" if self.label else self.strategy
        return allocation.describe(self.settings)


def pattern_masks(layers: list[PrunableLayer], counts: dict[str, int], pattern: Pattern,
                  scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks from per-layer scores: exact lowest-score counts (unstructured) or N:M groups where rows fit."""
    if not pattern.is_nm:
        return {ly.name: magnitude_mask(ly.weight, counts[ly.name], scores[ly.name]) for ly in layers}
    return {ly.name: nm_mask(scores[ly.name], pattern.n, pattern.m) if pattern.fits(ly)
            else magnitude_mask(ly.weight, 0) for ly in layers}
