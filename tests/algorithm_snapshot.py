"""What every shipped algorithm config resolves to: its label, family, options and budget fraction, and the
hash of its composed `algorithm` node. Committed results are keyed on labels and options, and jobs on
`config_hash` (sorted-key JSON of the resolved config, so an unchanged `algorithm` node keeps every job's
hash). `tests/fixtures/algorithm_configs.json` holds the values the configs had when the settings
dataclasses became their one home; `python -m tests.algorithm_snapshot --write` rewrites it, for a change
that means to move a label, an option or a hash.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ptsbench.config import CONF_DIR, compose_job_config
from ptsbench.models import stable_hash
from ptsbench.runner import build_algorithm

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "algorithm_configs.json"


def algorithm_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))


def snapshot(overrides: list[str]) -> dict[str, Any]:
    cfg = compose_job_config(overrides)
    algorithm = build_algorithm(cfg)
    node = OmegaConf.to_container(cfg.algorithm, resolve=True)
    return json.loads(json.dumps({
        "label": algorithm.label, "family": algorithm.family, "budget_fraction": algorithm.budget_fraction,
        "options": algorithm.options(), "algorithm_hash": stable_hash(node, length=16),
    }))


def snapshots() -> dict[str, dict[str, Any]]:
    return {name: snapshot([f"algorithm={name}"]) for name in algorithm_names()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"rewrite {FIXTURE}")
    parser.add_argument("--out", type=Path, help="write the snapshots here instead")
    args = parser.parse_args()
    text = json.dumps(snapshots(), indent=1, sort_keys=True) + "\n"
    if args.write or args.out:
        (args.out or FIXTURE).write_text(text)
    else:
        print(text)
