"""Result records: one JSON file per job, written atomically, gathered into a DataFrame."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ptsbench.errors import ConfigError

RESULT_FILE = "result.json"
ALLOCATION_FILE = "allocation.csv"
CALIB_FILE = "calib_indices.json"
RECORDS_FILE = "records.jsonl"  # a study's records, one per line (ptsbench.analysis.study)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure atomically (write a hidden temporary file, then rename) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    fig.clf()
    tmp.replace(path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def write_csv(path: Path, table: pd.DataFrame) -> None:
    write_atomic(path, table.to_csv(index=False))


def find_result_files(dirs: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for d in dirs:
        d = Path(d)
        if d.is_file() and d.name == RESULT_FILE:
            files.append(d)
        elif d.is_dir():
            files.extend(sorted(d.rglob(RESULT_FILE)))
    return files


def read_records_file(path: Path) -> list[dict[str, Any]]:
    """The records of a study's records.jsonl, in file order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finished(record: dict[str, Any], config_id: str) -> bool:
    return record.get("config_hash") == config_id and record.get("status") == "ok"


def is_dirty(record: Mapping[str, Any]) -> bool:
    """The record was made by a git checkout with uncommitted changes (an installed package records none)."""
    return str(record.get("git_commit") or "").endswith("-dirty")


def find_finished(config_id: str, dirs: Iterable[Path], studies: Iterable[Path] = ()
                  ) -> tuple[dict[str, Any], Path] | None:
    """(record, where) of a finished job with this config hash and status ok: a result.json under `dirs`,
    else a record of one of the collected `studies` (records.jsonl; a fresh clone's committed results) made
    by a clean tree."""
    for path in find_result_files(d for d in dirs if d.exists()):
        try:
            done = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if _finished(done, config_id):
            return done, path.parent
    for study in studies:
        path = study / RECORDS_FILE
        if not path.is_file():
            raise ConfigError(f"resume_studies: {study} holds no {RECORDS_FILE}; it must be a collected study "
                              "folder such as results/pts_methods.")
        # a collected study's record stands for committed code only: a dirty one is run again
        done = next((r for r in read_records_file(path) if _finished(r, config_id) and not is_dirty(r)), None)
        if done is not None:
            return done, study
    return None


def load_records(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """All result records under `dirs` as one row each (nested `stats` and `options` flattened). A study
    folder (or its records.jsonl) gives its collected records; any other folder, the result.json files
    of the job folders below it."""
    rows = []
    job_dirs = []
    for d in map(Path, dirs):
        study = d if d.name == RECORDS_FILE else d / RECORDS_FILE
        if study.is_file():  # the calibration indices (1,024 ints a job) are for reproducing, not for tables
            rows.extend({k: v for k, v in r.items() if k != "calib_indices"} for r in read_records_file(study))
        else:
            job_dirs.append(d)
    for path in find_result_files(job_dirs):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            rows.append({"status": "unreadable", "error": f"{path}: {exc}", "job_dir": str(path.parent)})
            continue
        record["job_dir"] = str(path.parent)  # where the files are now (a result folder may have been moved)
        rows.append(record)
    if not rows:
        return pd.DataFrame()
    return pd.json_normalize(rows, sep=".")
