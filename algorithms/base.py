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
from ptsbench.sparsity import PrunableLayer


def _no_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    return None


@dataclass
class PruneContext:
    calib: CalibrationSet
    device: torch.device
    seed: int
    progress: bool = True
    log_metrics: Callable[[dict[str, float], int | None], None] = _no_metrics
    workdir: Path | None = None

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the job seed; `offset` separates independent random streams."""
        return torch.Generator().manual_seed(int(self.seed) * 1_000_003 + offset)


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

    @abstractmethod
    def prune(self, model: nn.Module, layers: list[PrunableLayer], target: float, ctx: PruneContext) -> PruneResult:
        """Return `model` (or a new model) pruned to global sparsity `target` over `layers`."""

    def options(self) -> dict[str, Any]:
        """The options that distinguish this run of the method in tables (JSON-able)."""
        return {}

    @property
    def label(self) -> str:
        """A short method name for tables and plot legends, e.g. 'magnitude-erk+bn'."""
        return self.name

    def validate(self, layers: list[PrunableLayer], target: float) -> None:
        """Check options against the model before any expensive work; raise ConfigError on bad input."""
        return None
