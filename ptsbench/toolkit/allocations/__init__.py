"""The allocation axis: how a global target is split across the prunable layers, one registered function per
allocation, as in jaxpruner's registries (and `ptsbench.toolkit.scores` here).

Every allocation has the same signature, `allocate(layers, target, inputs) -> {layer: zeros}`, exact whole
counts whose total the audit checks against target x weights; `inputs` carries what an allocation may read
beside the weights (the dense input norms, for the calibrated ones such as OWL) and its options (their
registered defaults overridden by the method's). Each registration says whether the allocation reads
calibration statistics, which options it records and how it names itself in method labels.

Each module of this package registers its allocations with `register_allocation` and is imported on first
lookup (pkgutil), so a new allocation is a new module here; no list elsewhere names them. Replaying another
job's allocation.csv (`allocation=from_file`) is not one of them: it is `ptsbench.toolkit.allocation`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ptsbench.errors import PtsbenchError, unknown_choice
from ptsbench.toolkit.registry import import_modules, register_once
from ptsbench.toolkit.sparsity import PrunableLayer, check_sparsity

# The name of the allocation that replays another job's per-layer file (`ptsbench.toolkit.allocation`):
# accepted wherever an allocation is chosen, but not a function of the layers, so not registered here.
FROM_FILE = "from_file"


@dataclass(frozen=True)
class AllocationInputs:
    """What an allocation may read beside the layers' weights and the target."""

    # each layer's squared L2 input norms over the dense network's calibration inputs
    # (`ptsbench.toolkit.layerwise.dense_input_norms`); given only to allocations that need calibration
    squares: Mapping[str, torch.Tensor] | None = None
    # the allocation's settings: its registered defaults, overridden by the method's own options
    options: Mapping[str, float] = field(default_factory=dict)


AllocationFunction = Callable[[list[PrunableLayer], float, AllocationInputs], dict[str, int]]
LabelFunction = Callable[[Mapping[str, float]], str]


@dataclass(frozen=True)
class Allocation:
    name: str
    function: AllocationFunction
    needs_calibration: bool = False  # reads `AllocationInputs.squares` (one pass of the dense network)
    options: Mapping[str, float] = field(default_factory=dict)  # recorded option names and their defaults
    label: LabelFunction | None = None  # its part of a method label from its options; default: the name

    def settings(self, given: Mapping[str, float] | None = None) -> dict[str, float]:
        """Its options, each the method's value where given, else the registered default; a method passes
        every allocation option it has, so the keys of other allocations are dropped here."""
        given = given or {}
        return {key: given.get(key, default) for key, default in self.options.items()}

    def __call__(self, layers: list[PrunableLayer], target: float,
                 squares: Mapping[str, torch.Tensor] | None = None,
                 options: Mapping[str, float] | None = None) -> dict[str, int]:
        """Zeros per layer for the global `target` over `layers`."""
        target = check_sparsity(target)
        if self.needs_calibration and squares is None:
            raise PtsbenchError(f"allocation={self.name} needs the layers' dense input norms "
                                "(dense_input_norms).")
        return self.function(layers, target, AllocationInputs(squares, self.settings(options)))

    def describe(self, options: Mapping[str, float] | None = None) -> str:
        """Its part of a method label."""
        return self.name if self.label is None else self.label(self.settings(options))


_REGISTRY: dict[str, Allocation] = {}


def register_allocation(name: str, *, needs_calibration: bool = False,
                        options: Mapping[str, float] | None = None,
                        label: LabelFunction | None = None
                        ) -> Callable[[AllocationFunction], AllocationFunction]:
    """Decorator: register `function` as allocation `name` (a name may be registered once)."""

    def register(function: AllocationFunction) -> AllocationFunction:
        if name == FROM_FILE:
            raise PtsbenchError(f"allocation {name!r} is the replay of another job's file; give the "
                                f"allocation in {function.__module__} another name.")
        register_once(_REGISTRY, "allocation", name,
                      Allocation(name, function, needs_calibration, dict(options or {}), label))
        return function

    return register


def available_allocations() -> dict[str, Allocation]:
    """Every registered allocation, after importing each module of this package."""
    import_modules(__path__, __name__)
    return dict(_REGISTRY)


def weight_only_allocations() -> tuple[str, ...]:
    """The allocations computed from the weights alone (no calibration pass), sorted."""
    return tuple(sorted(name for name, a in available_allocations().items() if not a.needs_calibration))


def get_allocation(name: str) -> Allocation:
    """The allocation registered as `name`; an unknown name is a ConfigError naming the known ones."""
    found = available_allocations()
    if name not in found:
        raise unknown_choice("allocation", name, (*found, FROM_FILE))
    return found[name]


def allocate(layers: list[PrunableLayer], target: float, method: str,
             erk_power_scale: float = 1.0) -> dict[str, int]:
    """Per-layer counts of weights to remove so that the global sparsity over `layers` is `target`, for the
    weight-only allocations (the calibrated ones take their statistics through
    `ptsbench.toolkit.allocation`)."""
    target = check_sparsity(target)
    names = weight_only_allocations()
    if method not in names:
        raise unknown_choice("allocation", method, (*names, FROM_FILE))
    return _REGISTRY[method](layers, target, options={"erk_power_scale": erk_power_scale})


# The weight-only names when the package is first imported, for settings whose choices are fixed when their
# class is defined (POT's `allocation` option) and for the studies' lists; lookups by name go through
# `available_allocations`, which also sees a module added later.
ALLOCATIONS = weight_only_allocations()
