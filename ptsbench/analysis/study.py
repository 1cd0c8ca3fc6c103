"""Studies: the committed, machine-readable form of a set of jobs, and the lists that define them.

    python -m ptsbench.analysis.study RUN_DIR [RUN_DIR ...] --out results/<study> [--algorithms NAME ...]

`collect` reads the job folders under the RUN_DIRs (result.json, allocation.csv, calib_indices.json,
Hydra's overrides) and writes into the study folder

* `records.jsonl`: one record per job (result.json, plus the calibration indices as `calib_indices` and
  the command-line overrides as `overrides`), sorted by model, method, target sparsity, seed and config
  hash; absolute paths inside a run folder are made relative to it (`job` is the job folder's), so a
  study reads the same on any machine. Where one config ran twice, the finished, most recent run is kept.
* `allocations.csv`: every job's per-layer allocation in long form, keyed by `config_hash`.

`ptsbench-report results/<study>` then builds the tables and plots from the study alone. The lists of a
study (which algorithm configs it runs or selects, which are baselines or learned) are read here from
conf/experiment/<name>.yaml (the sweeps) and conf/study/<name>.yaml (the analyses), and method labels
come from the algorithm classes themselves (`method_label`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from ptsbench.analysis import program
from ptsbench.config import CONF_DIR
from ptsbench.errors import ConfigError, DataError, unknown_choice
from ptsbench.results import (
    ALLOCATION_FILE,
    CALIB_FILE,
    RECORDS_FILE,
    _jsonable,
    find_result_files,
    is_dirty,
    load_records,
    read_records_file,
    write_atomic,
    write_csv,
)

log = logging.getLogger(__name__)

ALLOCATIONS_FILE = "allocations.csv"
JOB_KEY = "config_hash"  # identifies a job in records.jsonl and allocations.csv
SORT_KEYS = ("model", "method", "target_sparsity", "seed", JOB_KEY)
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"


# ------------------------------------------------------------------------------------------- collect


def _relative_paths(obj: Any, root: str) -> Any:
    """`obj` with every string that is a path inside `root` made relative to it."""
    if isinstance(obj, str) and obj.startswith(root + os.sep):
        return obj[len(root) + 1:]
    if isinstance(obj, dict):
        return {k: _relative_paths(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative_paths(v, root) for v in obj]
    return obj


def read_job(job: Path, run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """One job folder as (study record, allocation table or None)."""
    try:
        record = json.loads((job / "result.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{job / 'result.json'} cannot be read: {exc}") from None
    root = str(run_dir.resolve())
    record.pop("job_dir", None)  # where it ran; `job` says where it sits in the run folder
    record = _relative_paths(record, root)
    record["job"] = os.path.relpath(job.resolve(), root) if job.resolve() != Path(root) else job.name
    calib = job / CALIB_FILE
    if calib.is_file():
        record["calib_indices"] = json.loads(calib.read_text()).get("indices")
    overrides = job / OVERRIDES_FILE
    if overrides.is_file():
        record["overrides"] = OmegaConf.to_container(OmegaConf.load(overrides))
    allocation = job / ALLOCATION_FILE
    return record, (pd.read_csv(allocation) if allocation.is_file() else None)


def _newest_first(record: Mapping[str, Any]) -> tuple[bool, str]:
    return record.get("status") == "ok", str(record.get("finished_at") or "")


def _sort_key(record: Mapping[str, Any]) -> tuple:
    """SORT_KEYS in order, numbers as numbers, missing values last."""
    def part(value: Any) -> tuple[int, float, str]:
        if value is None:
            return (1, 0.0, "")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (0, float(value), "")
        return (0, 0.0, str(value))

    return tuple(part(record.get(k)) for k in SORT_KEYS)


def study_jobs(study: str | Path) -> dict[str, tuple[dict[str, Any], pd.DataFrame | None]]:
    """config hash -> (record, allocation table) of a collected study folder (empty if it has none)."""
    path = Path(study) / RECORDS_FILE
    if not path.is_file():
        return {}
    allocations = study_allocations(study)
    by_job = dict(iter(allocations.groupby(JOB_KEY))) if len(allocations) else {}
    return {str(r[JOB_KEY]): (r, by_job[r[JOB_KEY]].drop(columns=JOB_KEY).reset_index(drop=True)
                              if r[JOB_KEY] in by_job else None)
            for r in read_records_file(path)}


def collect_jobs(run_dirs: Iterable[str | Path], methods: Iterable[str] | None = None,
                 keep: str | Path | None = None) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """(records, long allocation table) of the job folders under `run_dirs`, one per config hash (the
    finished, most recent run where a config ran twice), only the `methods` labels if given. With `keep`,
    the jobs already collected in that study folder stay (a fresh clone's committed records plus the jobs
    it ran since), and a job that ran again replaces its record by the same rule."""
    wanted = set(methods) if methods is not None else None
    best: dict[str, tuple[dict[str, Any], pd.DataFrame | None]] = {}
    dirty: list[str] = []
    if keep is not None:
        best = {k: v for k, v in study_jobs(keep).items()
                if (wanted is None or v[0].get("method") in wanted) and not is_dirty(v[0])}
    for run_dir in map(Path, run_dirs):
        if not run_dir.exists():
            raise DataError(f"Run folder {run_dir} does not exist: run the study's sweep first.")
        for path in find_result_files([run_dir]):
            record, allocation = read_job(path.parent, run_dir)
            if wanted is not None and record.get("method") not in wanted:
                continue
            if is_dirty(record):  # no reader could tell which code made it
                dirty.append(str(path.parent))
                continue
            key = str(record.get(JOB_KEY) or record["job"])
            if key not in best or _newest_first(record) > _newest_first(best[key][0]):
                best[key] = (record, allocation)
    if dirty:
        log.warning("Left out %d job(s) run from a tree with uncommitted changes (git_commit ends in "
                    "-dirty), e.g. %s: commit, then rerun them.", len(dirty), ", ".join(dirty[:3]))
    jobs = sorted(best.values(), key=lambda pair: _sort_key(pair[0]))
    records = [record for record, _ in jobs]
    tables = [table.assign(**{JOB_KEY: record.get(JOB_KEY)}) for record, table in jobs if table is not None]
    allocations = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=[JOB_KEY])
    return records, allocations[[JOB_KEY, *(c for c in allocations.columns if c != JOB_KEY)]]


def write_study(out: str | Path, records: Sequence[Mapping[str, Any]], allocations: pd.DataFrame) -> None:
    """records.jsonl and allocations.csv, each written atomically."""
    out = Path(out)
    lines = [json.dumps(_jsonable(dict(r)), sort_keys=True) for r in records]
    write_atomic(out / RECORDS_FILE, "".join(line + "\n" for line in lines))
    write_csv(out / ALLOCATIONS_FILE, allocations)


def collect(run_dirs: Iterable[str | Path], out: str | Path, methods: Iterable[str] | None = None,
            add: bool = False) -> list[dict[str, Any]]:
    """Collect the jobs under `run_dirs` into the study folder `out` (with `add`, beside the jobs `out`
    already holds); returns the records."""
    records, allocations = collect_jobs(run_dirs, methods, keep=out if add else None)
    if not records:
        raise DataError(f"No job folders (result.json) under {', '.join(map(str, run_dirs))}"
                        + (f" for the methods {sorted(methods)}" if methods is not None else "") + ".")
    write_study(out, records, allocations)
    return records


# --------------------------------------------------------------------------------------- read a study


def study_records(study: str | Path) -> pd.DataFrame:
    """A study's records as a flat DataFrame (as `load_records` gives them), empty if it has none."""
    path = Path(study) / RECORDS_FILE
    return load_records([path]) if path.is_file() else pd.DataFrame()


def calibration_indices(study: str | Path) -> dict[str, list[int]]:
    """config hash -> the train-split indices of the job's calibration images."""
    return {r[JOB_KEY]: r["calib_indices"] for r in read_records_file(Path(study) / RECORDS_FILE)
            if r.get("calib_indices") is not None}


def study_allocations(study: str | Path) -> pd.DataFrame:
    """A study's long allocation table (`allocations.csv`)."""
    path = Path(study) / ALLOCATIONS_FILE
    if not path.is_file():
        raise DataError(f"{path} does not exist: collect the study first "
                        "(python -m ptsbench.analysis.study).")
    return pd.read_csv(path, dtype={JOB_KEY: str})  # a hash of digits only must not turn into a number


def job_allocation(allocations: pd.DataFrame, config_hash: str) -> pd.DataFrame:
    """One job's per-layer rows (the job's own allocation.csv, in layer order)."""
    rows = allocations[allocations[JOB_KEY] == config_hash]
    if rows.empty:
        raise DataError(f"No allocation rows for job {config_hash} in the study's {ALLOCATIONS_FILE}.")
    return rows.drop(columns=[JOB_KEY]).dropna(axis="columns", how="all").reset_index(drop=True)


# ------------------------------------------------------------------------------ the lists of studies


def config_names(group: str) -> list[str]:
    """The config names of one group of conf/ (algorithm, model, experiment, study)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_names(key: str, names: Iterable[str], group: str = "algorithm") -> list[str]:
    """`names` unchanged, after checking that each is a config of `group`."""
    names = [str(n) for n in names]
    allowed = config_names(group)
    for name in names:
        if name not in allowed:
            raise unknown_choice(f"{group} config in {key}:", name, allowed)
    return names


def study_config(name: str) -> DictConfig:
    """conf/study/<name>.yaml: an analysis's settings (which algorithm configs play which role)."""
    path = CONF_DIR / "study" / f"{name}.yaml"
    if not path.is_file():
        raise unknown_choice("study", name, config_names("study"))
    return OmegaConf.load(path)


def experiment_grid(name: str) -> dict[str, list[str]]:
    """The sweep grid of conf/experiment/<name>.yaml: parameter -> its values, as the sweeper splits them."""
    path = CONF_DIR / "experiment" / f"{name}.yaml"
    if not path.is_file():
        raise unknown_choice("experiment", name, config_names("experiment"))
    params = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params", default=None) or {}
    return {str(k): [v.strip() for v in str(val).split(",")] for k, val in params.items()}


def experiment_algorithms(name: str) -> list[str]:
    """The algorithm configs an experiment sweeps (its one list: scripts and analyses read it here)."""
    grid = experiment_grid(name)
    if "algorithm" not in grid:
        raise ConfigError(f"conf/experiment/{name}.yaml sweeps no algorithm "
                          "(hydra.sweeper.params.algorithm).")
    return check_names(f"conf/experiment/{name}.yaml", grid["algorithm"])


@cache
def _label(algorithm: str, overrides: tuple[str, ...], family: bool = False) -> str:
    from ptsbench.config import compose_job_config
    from ptsbench.runner import build_algorithm

    built = build_algorithm(compose_job_config([f"algorithm={algorithm}", *overrides]))
    return built.family if family else built.label


def method_label(algorithm: str, overrides: Sequence[str] = ()) -> str:
    """The method label the jobs of algorithm config `algorithm` record (the class computes it)."""
    check_names("method_label", [algorithm])
    return _label(algorithm, tuple(overrides))


def method_family(algorithm: str) -> str:
    """The label of `algorithm` without its budget tags: what every budget of that method records as
    `method_family`."""
    check_names("method_family", [algorithm])
    return _label(algorithm, (), family=True)


def method_labels(algorithms: Iterable[str]) -> dict[str, str]:
    """algorithm config -> method label, in the order given."""
    return {a: method_label(a) for a in algorithms}


@program("python -m ptsbench.analysis.study")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptsbench.analysis.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="folders holding job folders (result.json)")
    parser.add_argument("--out", required=True, help="the study folder (records.jsonl, allocations.csv)")
    select = parser.add_mutually_exclusive_group()
    select.add_argument("--algorithms", nargs="+", metavar="CONFIG",
                        help="only jobs of these algorithm configs (their method labels)")
    select.add_argument("--study", metavar="NAME",
                        help="only jobs of the algorithm configs conf/study/NAME.yaml lists")
    parser.add_argument("--add", action="store_true",
                        help="keep the jobs OUT already holds (e.g. the committed ones) and add or replace "
                             "those of RUN_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    algorithms = args.algorithms
    if args.study:
        algorithms = check_names(f"conf/study/{args.study}.yaml algorithms",
                                 study_config(args.study).get("algorithms") or [])
    methods = list(method_labels(algorithms).values()) if algorithms else None
    records = collect(args.runs, args.out, methods, add=args.add)
    log.info("%d jobs -> %s/{%s,%s}", len(records), args.out, RECORDS_FILE, ALLOCATIONS_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
