"""The plug-in contract, for every algorithm config shipped in conf/algorithm/: it composes, builds, prunes a
small real model on real data through the runner, lands on the exact target, and the harness's own audit
agrees with the allocation the method reports."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ptsbench.results import ALLOCATION_FILE
from ptsbench.runner import run_job
from tests.conftest import CONF, compose_config

ALGORITHMS = sorted(p.stem for p in (CONF / "algorithm").glob("*.yaml"))

# A ResNet-18 at an eighth of its width keeps every code path (stem, residual blocks, BN, classifier)
# while each method's budget below stays a few seconds; the reference presets are cut to a few steps.
SMALL = ["model.checkpoint=null", "model.img_size=28", "+model.kwargs.channels=[8,16,32,64]",
         "data.limit_train=512", "data.limit_test=200", "train.epochs=1", "calib.n=64", "calib.batch_size=32",
         "progress=false", "sparsity=0.8"]
BUDGET = {
    "fcpts": ["algorithm.optimization.iterations=4", "algorithm.optimization.batch_size=32"],
    "unipts": ["algorithm.search.population_size=4", "algorithm.search.generations=2",
               "algorithm.search.num_parents=2",
               "algorithm.training.epochs=1", "algorithm.training.batch_size=32",
               "algorithm.search.fitness_set_size=64"],
    "pot": ["algorithm.reconstruction.iterations=5", "algorithm.reconstruction.batch_size=32"],
    "magnitude": ["algorithm.reconstruction.iterations=5"],
}


def budget(algorithm: str, cfg_keys: set[str]) -> list[str]:
    family = next((f for f in BUDGET if algorithm.startswith(f)), None)
    overrides = BUDGET.get(family, [])
    # a nested key (algorithm.search.generations) counts when its node is one of the config's keys
    return [o for o in overrides if o.split("=")[0].removeprefix("algorithm.").split(".")[0] in cfg_keys]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_config_prunes_to_the_exact_target(algorithm, cache_dir, require_fmnist, tmp_path):
    keys = set(compose_config([f"algorithm={algorithm}"]).algorithm.keys())
    cfg = compose_config([*SMALL, f"algorithm={algorithm}", *budget(algorithm, keys)], cache_dir=cache_dir)
    record = run_job(cfg, tmp_path / "job")
    assert record["status"] == "ok", record.get("error")
    # the global target, to within one weight per layer (allocations round per layer)
    layers = pd.read_csv(Path(record["job_dir"]) / ALLOCATION_FILE)
    assert abs(record["zero_weights"] - 0.8 * record["prunable_params"]) <= len(layers)
    # the harness's count per layer equals the allocation the method says it aimed for
    aimed = (layers["target_sparsity"] * layers["params"]).round()
    assert (aimed - layers["zeros"]).abs().max() <= 1
    assert layers["zeros"].sum() == record["zero_weights"]
    assert record["effective_sparsity"] >= record["achieved_sparsity"] - 1e-12
