"""OWL (Yin et al., ICML 2024): rates from each layer's share of outlier Wanda scores on the dense
network's inputs (`ptsbench.toolkit.owl`, which holds the method and its reading of the paper). Its options
are `algorithm.owl`'s M and lambda, recorded as owl_m and owl_lambda."""

from __future__ import annotations

from collections.abc import Mapping

from ptsbench.toolkit.allocations import AllocationInputs, register_allocation
from ptsbench.toolkit.owl import OWLSettings, owl_counts
from ptsbench.toolkit.sparsity import PrunableLayer

DEFAULTS = OWLSettings()


def owl_label(options: Mapping[str, float]) -> str:
    m, lam = options["owl_m"], options["owl_lambda"]
    return "owl" if (m, lam) == (DEFAULTS.m, DEFAULTS.lam) else f"owl-m{m:g}-l{lam:g}"


@register_allocation("owl", needs_calibration=True, options={"owl_m": DEFAULTS.m, "owl_lambda": DEFAULTS.lam},
                     label=owl_label)
def owl(layers: list[PrunableLayer], target: float, inputs: AllocationInputs) -> dict[str, int]:
    settings = OWLSettings(m=inputs.options["owl_m"], lam=inputs.options["owl_lambda"])
    return owl_counts(layers, target, inputs.squares, settings)
