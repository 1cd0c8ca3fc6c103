"""The contract between the harness and a PTS method.

The harness hands an algorithm a dense model, its prunable layers (found by the harness's policy), the
global target and a context (calibration data, device, seed, progress, metric logger). The algorithm
returns the sparse model with its masks baked in, the per-layer allocation it aimed for, and its own
statistics. The harness, not the algorithm, times it, audits the zeros and evaluates accuracy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch
from torch import nn

from ptsbench.data import CalibrationSet
from ptsbench.errors import ConfigError
from ptsbench.streams import stream, stream_generator
from ptsbench.toolkit.patterns import UNSTRUCTURED, Pattern
from ptsbench.toolkit.sparsity import PrunableLayer


def _no_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    return None


@dataclass
class PruneContext:
    calib: CalibrationSet
    device: torch.device
    seed: int
    progress: bool = True
    # torch.compile weight-sized elementwise chains (the `compile` key): an execution setting like the
    # thread count, so it is not part of a job's identity; reductions may round differently
    compile: bool = False
    log_metrics: Callable[[dict[str, float], int | None], None] = _no_metrics
    workdir: Path | None = None

    def generator(self, name: str) -> torch.Generator:
        """A CPU generator on the job-seeded stream `name`, registered in ptsbench/streams.py."""
        entry = stream(name)
        if entry.seed_key != "seed":
            raise ValueError(f"Stream {name!r} is seeded from {entry.seed_key}, not the job seed; the "
                             "harness draws it, not a method.")
        return stream_generator(name, self.seed)


@dataclass
class PruneResult:
    model: nn.Module  # the sparse model, masks baked into plain weights
    allocation: dict[str, float]  # layer name -> the sparsity the method aimed for
    masks: dict[str, torch.Tensor]  # layer name -> {0,1} mask
    stats: dict[str, Any] = field(default_factory=dict)  # JSON-able: passes, losses, residuals ...
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # saved as <name>.csv next to the result


class PTSAlgorithm(ABC):
    """Base class: hyperparameters are constructor arguments, built by `hydra.utils.instantiate`."""

    name: ClassVar[str]
    # N:M fixes every layer's rate at 1 - N/M: a method that chooses its own per-layer rates (learned or
    # global allocations) cannot honour it, so the harness refuses the combination (`set_pattern`).
    supports_nm_pattern: ClassVar[bool] = False
    pattern: Pattern = UNSTRUCTURED  # set by the harness from the top-level `pattern` key

    def set_pattern(self, pattern: Pattern) -> None:
        """Take the job's pattern, or refuse it before any work when the method cannot follow it."""
        if pattern.is_nm and not self.supports_nm_pattern:
            raise ConfigError(f"pattern={pattern} cannot be combined with algorithm {self.name}: it chooses "
                              "its own per-layer sparsities, which an N:M pattern fixes at 1 - N/M = "
                              f"{pattern.sparsity:.4g} "
                              "in every layer. Use pattern=unstructured, or magnitude, wanda, sparsegpt or "
                              "ria for N:M.")
        self.pattern = pattern

    @abstractmethod
    def prune(self, model: nn.Module, layers: list[PrunableLayer], target: float,
              ctx: PruneContext) -> PruneResult:
        """Return `model` (or a new model) pruned to global sparsity `target` over `layers`; `target` is a
        float in [0, 1), checked with the job's config (`ptsbench.jobspec.JobSpec`)."""

    def options(self) -> dict[str, Any]:
        """The options that distinguish this run of the method in tables (JSON-able)."""
        return {}

    @property
    def label(self) -> str:
        """A short method name for tables and plot legends, e.g. 'magnitude-erk+bn' or
        'fcpts-ste-kde-quick-64it': the family and what differs from the reference budget."""
        return "-".join([self.family, *self.budget_tags()])

    @property
    def family(self) -> str:
        """The label without its budget tags: the points of one method's budget curve share it."""
        return self.name

    def budget_tags(self) -> list[str]:
        """The label's words for a budget other than the reference (none for methods without a budget
        knob)."""
        return []

    @property
    def budget_fraction(self) -> float | None:
        """The work this run's budget buys, as a share of the method's reference budget (None: no knob)."""
        return None

    def budget_work(self) -> str | None:
        """This run's work in the method's own units beside the reference's, e.g. '3,200 optimisation
        iterations (reference: 1,600)', for the harness's message about a budget (None: no knob)."""
        return None

    def validate(self, layers: list[PrunableLayer], target: float) -> None:
        """Check options against the model before any expensive work; raise ConfigError on bad input."""
        return None
