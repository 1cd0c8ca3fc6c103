"""Every shipped algorithm config keeps its label, options, family, budget fraction and config hash
(tests/fixtures/algorithm_configs.json, see tests/algorithm_snapshot.py), and a yaml value outside the
settings dataclass's range fails before any work, naming the dotted key."""

from __future__ import annotations

import json
import shutil

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ptsbench.config import CONF_DIR, check_config
from ptsbench.errors import ConfigError
from ptsbench.runner import build_algorithm
from tests.algorithm_snapshot import FIXTURE, algorithm_names, snapshot

EXPECTED = json.loads(FIXTURE.read_text())


def test_the_fixture_names_every_shipped_algorithm_config():
    assert sorted(EXPECTED) == algorithm_names(), \
        "a config was added or removed: python -m tests.algorithm_snapshot --write, and review the diff"


@pytest.mark.parametrize("name", algorithm_names())
def test_label_options_and_hash_are_those_of_the_committed_results(name):
    assert snapshot([f"algorithm={name}"]) == EXPECTED[name]


@pytest.mark.parametrize(("preset", "node", "key", "value"), [
    ("fcpts", "optimization", "iterations", 0),
    ("unipts_quick", "search", "mutation_prob", 1.5),
    ("pot", "reconstruction", "lr", -1.0),
])
def test_a_yaml_value_out_of_range_is_refused_naming_the_key(tmp_path, preset, node, key, value):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    yaml = f"defaults:\n  - {preset}\n  - _self_\n{node}:\n  {key}: {value}\n"
    (conf / "algorithm" / "bad.yaml").write_text(yaml)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["algorithm=bad"])
    for check in (check_config, build_algorithm):
        with pytest.raises(ConfigError, match=rf"algorithm\.{node}\.{key}={value}"):
            check(cfg)


@pytest.mark.parametrize(("preset", "line", "match"), [
    ("sparsegpt_bn", "blocksize: 0", r"algorithm\.blocksize=0 is not allowed: it must be a whole number"),
    ("ria_bn", "activation_exponent: -1", r"algorithm\.activation_exponent=-1"),
    ("wanda_bn", "calib_protocol: stale", r"algorithm\.calib_protocol.*stale.*dense, sequential"),
    ("magnitude_erk_bn", "bn_batch_size: 0", r"algorithm\.bn_batch_size=0"),
    ("random_erk_bn", "allocation: owl", r"algorithm\.allocation=owl reads calibration statistics"),
    ("random_erk_bn", "score: magnitude", r"algorithm \(RandomSettings\) has no option 'score'"),
    ("wanda_bn", "dsnot: {max_cycles: 5}", r"algorithm\.dsnot sets DSnoT's options, but .*refine=none"),
])
def test_a_one_shot_or_score_preset_is_checked_by_its_settings_dataclass(tmp_path, preset, line, match):
    """The one-shot and score methods' nodes are read through their settings dataclasses too: a bad
    top-level value or a key the method does not have fails in check_config, before any work."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "algorithm" / "bad.yaml").write_text(f"defaults:\n  - {preset}\n  - _self_\n{line}\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["algorithm=bad"])
    for check in (check_config, build_algorithm):
        with pytest.raises(ConfigError, match=match):
            check(cfg)


def test_every_method_with_a_settings_dataclass_is_in_the_config_store():
    """The ConfigStore's schemas come from the yaml files (`algorithm_schemas`): every base preset that
    names `/schema/algorithm/<name>` is registered under its class's settings, with the keys its presets
    compose today (the optional nodes, owl and dsnot, and the keys set only by name stay out)."""
    from hydra.core.config_store import ConfigStore

    from ptsbench.config import algorithm_schemas

    schemas = algorithm_schemas()
    assert {"fcpts", "unipts", "pot", "magnitude", "random", "wanda", "sparsegpt", "ria"} <= set(schemas)
    store = ConfigStore.instance().repo["schema"]["algorithm"]
    for name in schemas:
        assert f"{name}.yaml" in store, name
    wanda = OmegaConf.to_container(store["wanda.yaml"].node)
    assert set(wanda) == {"allocation", "erk_power_scale", "allocation_file", "allocation_label",
                          "batch_size", "bn_recalibration", "calib_protocol"}
    assert set(OmegaConf.to_container(store["random.yaml"].node)) == {"allocation", "erk_power_scale",
                                                                      "bn_recalibration"}
