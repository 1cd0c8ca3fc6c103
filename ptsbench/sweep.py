"""Sweep filters for hydra-filter-sweeper: cut cells out of a Cartesian grid.

Hydra's basic sweeper runs every combination. A benchmark often wants the cheap baselines everywhere and
the expensive methods only at a few sparsities; `SparsitiesFor` says so in the experiment config:

    defaults:
      - override /hydra/sweeper: filter
    hydra:
      sweeper:
        params: {algorithm: magnitude_erk_bn,fcpts_quick, sparsity: 0.5,0.9}
        filters:
          - ptsbench.sweep.SparsitiesFor:
              fcpts: [0.9]     # algorithm name (the class's `name`) -> the sparsities it runs at

Algorithms not named keep every sparsity. `ModelSparsities` keeps, for each model, only the sparsities its
config lists in `sweep_sparsities` or `discriminating_sparsities`, so one grid over the union serves models
whose ranges differ; `DiscriminatingFor` keeps the named (expensive) algorithms at the model's discriminating
sparsities only. The sweeper logs each skipped job with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hydra.utils import get_class
from hydra_filter_sweeper import AbstractFilter


def algorithm_name(config: Mapping[str, Any]) -> str | None:
    """The `name` of the job's algorithm class (fcpts, unipts, magnitude, pot ...), from its `_target_`."""
    target = (config.get("algorithm") or {}).get("_target_")
    if not target:
        return None
    return getattr(get_class(target), "name", None)


class SparsitiesFor(AbstractFilter):
    """Skip a job whose algorithm is named in the filter's arguments and whose sparsity is not listed."""

    def filter(self, **sparsities: Sequence[float]) -> bool:
        allowed = sparsities.get(algorithm_name(self.config) or "")
        if allowed is None:
            return False
        try:
            sparsity = float(self.config.get("sparsity"))
        except (TypeError, ValueError):
            return False  # not a number: the job runs and fails with ptsbench's own message
        return not any(abs(sparsity - float(s)) < 1e-9 for s in allowed)

    def reason(self, **sparsities: Sequence[float]) -> str:
        name = algorithm_name(self.config)
        return f"{name} runs only at sparsity {', '.join(str(s) for s in sparsities[name])} in this sweep"


def _same_sparsity(value: Any, allowed: Sequence[float]) -> bool:
    try:
        sparsity = float(value)
    except (TypeError, ValueError):
        return True  # not a number: the job runs and fails with ptsbench's own message
    return any(abs(sparsity - float(s)) < 1e-9 for s in allowed)


def _model_sparsities(config: Mapping[str, Any], *keys: str) -> list[float]:
    model = config.get("model") or {}
    return sorted({float(s) for key in keys for s in (model.get(key) or ())})


class ModelSparsities(AbstractFilter):
    """Skip a job whose sparsity is in neither its model config's `sweep_sparsities` nor its
    `discriminating_sparsities` (when the model lists any)."""

    keys = ("sweep_sparsities", "discriminating_sparsities")

    def filter(self) -> bool:
        allowed = _model_sparsities(self.config, *self.keys)
        return bool(allowed) and not _same_sparsity(self.config.get("sparsity"), allowed)

    def reason(self) -> str:
        allowed = _model_sparsities(self.config, *self.keys)
        model = (self.config.get("model") or {}).get("name")
        return f"{model} is swept at sparsity {', '.join(map(str, allowed))}"


class DiscriminatingFor(AbstractFilter):
    """Skip a job of the named algorithms (class `name`s) whose sparsity is not one of its model's
    `discriminating_sparsities`: the expensive methods run only where methods separate."""

    def filter(self, algorithms: Sequence[str]) -> bool:
        if algorithm_name(self.config) not in set(algorithms):
            return False
        allowed = _model_sparsities(self.config, "discriminating_sparsities")
        return bool(allowed) and not _same_sparsity(self.config.get("sparsity"), allowed)

    def reason(self, algorithms: Sequence[str]) -> str:
        allowed = _model_sparsities(self.config, "discriminating_sparsities")
        return (f"{algorithm_name(self.config)} runs at the model's discriminating sparsities {allowed} "
                "in this sweep")


class NMOnlyWhere(AbstractFilter):
    """Skip an unstructured job whose algorithm config has every given option value (for instance
    `bn_recalibration: true`): those variants run only with N:M patterns in this sweep."""

    def filter(self, **options: Any) -> bool:
        algorithm = self.config.get("algorithm") or {}
        unstructured = str(self.config.get("pattern", "unstructured")) == "unstructured"
        return unstructured and all(algorithm.get(key) == value for key, value in options.items())

    def reason(self, **options: Any) -> str:
        where = ", ".join(f"algorithm.{k}={v}" for k, v in options.items())
        return f"algorithms with {where} run only with N:M patterns in this sweep"
