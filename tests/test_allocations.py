"""The allocation axis as a registry: every registered allocation has the one signature and gives exact
counts, the names everywhere come from it, an unknown name fails as before, and a module dropped into
`ptsbench/toolkit/allocations/` is a new allocation, end to end through a job, with no edit elsewhere."""

from __future__ import annotations

import sys
import textwrap

import pandas as pd
import pytest
import torch

import ptsbench.toolkit.allocations as allocations_package
from ptsbench.errors import ConfigError, PtsbenchError
from ptsbench.toolkit.allocation import AllocationChoice
from ptsbench.toolkit.allocations import (
    ALLOCATIONS,
    FROM_FILE,
    allocate,
    available_allocations,
    get_allocation,
    register_allocation,
    weight_only_allocations,
)
from ptsbench.toolkit.layerwise import dense_input_norms
from ptsbench.toolkit.patterns import Pattern
from ptsbench.toolkit.sparsity import find_prunable_layers
from tests.test_owl import small_net
from tests.test_sparsegpt import tiny_calib


def test_every_allocation_gives_exact_counts_and_says_what_it_reads():
    model = small_net()
    layers = find_prunable_layers(model)
    torch.manual_seed(1)
    norms = dense_input_norms(model, layers, tiny_calib(torch.randn(24, 3, 5, 5)), 64)
    found = available_allocations()
    assert {"uniform", "erk", "global", "global_l2norm", "owl"} <= set(found)
    assert ALLOCATIONS == weight_only_allocations() == tuple(sorted(set(found) - {"owl"}))
    assert [name for name, a in found.items() if a.needs_calibration] == ["owl"]
    total = sum(ly.numel for ly in layers)
    for allocation in found.values():
        counts = allocation(layers, 0.7, norms if allocation.needs_calibration else None)
        assert set(counts) == {ly.name for ly in layers}, allocation.name
        assert all(0 <= counts[ly.name] <= ly.numel for ly in layers), allocation.name
        assert sum(counts.values()) == round(0.7 * total), allocation.name
    with pytest.raises(PtsbenchError, match="allocation=owl needs the layers' dense input norms"):
        get_allocation("owl")(layers, 0.7)


def test_labels_and_options_come_from_the_registration():
    assert get_allocation("erk").describe({"erk_power_scale": 0.5}) == "erk0.5"
    assert get_allocation("erk").describe() == "erk" and get_allocation("global").describe() == "global"
    owl = AllocationChoice.read("owl", owl={"m": 3})
    assert owl.describe(Pattern()) == "owl-m3-l0.08" and owl.needs_calibration
    assert owl.options() == {"allocation": "owl", "owl_m": 3, "owl_lambda": 0.08}
    # another allocation's options are not recorded
    assert AllocationChoice.read("uniform", erk_power_scale=2.0).options() == {"allocation": "uniform"}


def test_an_unknown_name_lists_the_registry_and_from_file():
    with pytest.raises(ConfigError, match=r"Unknown allocation 'ekr'\. Allowed: erk, from_file, global, "
                                          r"global_l2norm, owl, uniform\. Did you mean: erk"):
        AllocationChoice.read("ekr")
    # the weight-only entry point names what it computes
    with pytest.raises(ConfigError, match=r"Unknown allocation 'owl'\. Allowed: erk, from_file, global, "
                                          r"global_l2norm, uniform\."):
        allocate(find_prunable_layers(small_net()), 0.5, "owl")


def test_a_name_is_registered_once(monkeypatch):
    monkeypatch.setattr(allocations_package, "_REGISTRY", dict(allocations_package._REGISTRY))
    with pytest.raises(PtsbenchError, match="'erk' is registered twice"):
        register_allocation("erk")(lambda layers, target, inputs: {})
    with pytest.raises(PtsbenchError, match="'from_file' is the replay of another job's file"):
        register_allocation(FROM_FILE)(lambda layers, target, inputs: {})


TOY_ALLOCATION = '''
"""A toy allocation: the zeros fill the layers from the last one backwards."""

from ptsbench.toolkit.allocations import AllocationInputs, register_allocation
from ptsbench.toolkit.sparsity import PrunableLayer


@register_allocation("toy_last_first")
def last_first(layers: list[PrunableLayer], target: float, inputs: AllocationInputs) -> dict[str, int]:
    left = round(target * sum(ly.numel for ly in layers))
    counts = {}
    for ly in reversed(layers):
        counts[ly.name] = min(left, ly.numel)
        left -= counts[ly.name]
    return counts
'''


def last_first_counts(sizes: list[int], target: float) -> list[int]:
    left, counts = round(target * sum(sizes)), []
    for n in reversed(sizes):
        counts.append(min(left, n))
        left -= counts[-1]
    return counts[::-1]


def test_a_module_in_the_allocations_package_is_a_new_allocation(tiny_cfg, tmp_path, monkeypatch):
    folder = tmp_path / "package"
    folder.mkdir()
    (folder / "toy_last_first.py").write_text(textwrap.dedent(TOY_ALLOCATION))
    # the package folder as if the module had been dropped into ptsbench/toolkit/allocations/
    monkeypatch.setattr(allocations_package, "__path__", [*allocations_package.__path__, str(folder)])
    monkeypatch.setattr(allocations_package, "_REGISTRY", dict(allocations_package._REGISTRY))
    module = f"{allocations_package.__name__}.toy_last_first"
    try:
        from ptsbench.runner import run_job

        record = run_job(tiny_cfg("sparsity=0.5", "algorithm.allocation=toy_last_first"), tmp_path / "job")
        assert record["method"] == "magnitude-toy_last_first"
        table = pd.read_csv(tmp_path / "job" / "allocation.csv")
        # a layer's zeros already in the dense weights (the shipped fp16 weights hold a few) are its floor
        floor = dict(record["dense_zero_layers"])
        wanted = last_first_counts(table["params"].tolist(), 0.5)
        names = table["name"].tolist()
        floored = [max(c, floor.get(n, 0)) for c, n in zip(wanted, names, strict=True)]
        assert table["zeros"].tolist() == floored
        assert table["zeros"].iloc[0] == 0 < table["zeros"].iloc[-1]  # the stem stayed dense
    finally:
        sys.modules.pop(module, None)
        if hasattr(allocations_package, "toy_last_first"):
            delattr(allocations_package, "toy_last_first")
        monkeypatch.undo()
    assert "toy_last_first" not in available_allocations()
