"""Every shipped algorithm config keeps its label, options, family, budget fraction and config hash
(tests/fixtures/algorithm_configs.json, see tests/algorithm_snapshot.py), and a yaml value outside the
settings dataclass's range fails before any work, naming the dotted key."""

from __future__ import annotations

import json
import shutil

import pytest
from hydra import compose, initialize_config_dir

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
