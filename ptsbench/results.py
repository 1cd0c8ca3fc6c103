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

from ptsbench.errors import ConfigError, ResultsError

RESULT_FILE = "result.json"
ALLOCATION_FILE = "allocation.csv"
CALIB_FILE = "calib_indices.json"
RECORDS_FILE = "records.jsonl"  # a study's records, one per line (ptsbench.analysis.study)
IDENTITY_FILE = "job_identity.json"  # the config hash of the one job a folder belongs to
UNREADABLE = "unreadable"  # the status of a table row standing for a record file (or line) not read


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


def read_records_file(path: Path, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """The records of a study's records.jsonl, in file order.

    A line that is not a JSON object raises ResultsError naming the file and the line; with `problems`, the
    line is left out and described there instead (a report shows what it could read, and says what not).
    """
    records: list[dict[str, Any]] = []
    bad: list[str] = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        text = ""
        bad.append(f"{path} cannot be read as text ({type(exc).__name__}: {exc})")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(f"{path} line {number} is not JSON ({exc.msg}, column {exc.colno})")
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(f"{path} line {number} is not a record (a JSON object) but {type(record).__name__}")
    if bad and problems is None:
        raise ResultsError(bad[0] + (f" (and {len(bad) - 1} more lines)" if len(bad) > 1 else "")
                           + ": the records file is damaged; restore it (git checkout) or collect the study "
                           "again (python -m ptsbench.analysis.study).")
    if problems is not None:
        problems.extend(bad)
    return records


def read_studies(studies: Iterable[str | Path]) -> dict[Path, list[dict[str, Any]]]:
    """The records of each `resume_studies` folder; a folder without a readable records.jsonl is an error
    whether or not `resume` is set, so a typo in the list never passes unnoticed."""
    found: dict[Path, list[dict[str, Any]]] = {}
    for study in map(Path, studies):
        path = study / RECORDS_FILE
        if not path.is_file():
            raise ConfigError(f"resume_studies: {str(study)!r} holds no {RECORDS_FILE}; each entry must be "
                              "a collected study folder such as results/pts_methods (python -m "
                              "ptsbench.analysis.study writes one).")
        try:
            found[study] = read_records_file(path)
        except ResultsError as exc:
            raise ConfigError(f"resume_studies: {exc}") from None
    return found


def _finished(record: dict[str, Any], config_id: str) -> bool:
    return record.get("config_hash") == config_id and record.get("status") == "ok"


def is_dirty(record: Mapping[str, Any]) -> bool:
    """The record was made by a git checkout with uncommitted changes (an installed package records none)."""
    return str(record.get("git_commit") or "").endswith("-dirty")


def read_result(path: Path) -> dict[str, Any] | None:
    """A result.json's record, or None when it cannot be read or is not a record."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


Records = list[dict[str, Any]]


def find_finished(config_id: str, dirs: Iterable[Path], studies: Mapping[Path, Records] | None = None
                  ) -> tuple[dict[str, Any], Path] | None:
    """(record, where) of a finished job with this config hash and status ok: a result.json under `dirs`,
    else a record of one of the collected `studies` (`read_studies`; a fresh clone's committed results) made
    by a clean tree."""
    for path in find_result_files(d for d in dirs if d.exists()):
        done = read_result(path)
        if done is not None and _finished(done, config_id):
            return done, path.parent
    for study, records in (studies or {}).items():
        # a collected study's record stands for committed code only: a dirty one is run again
        done = next((r for r in records if _finished(r, config_id) and not is_dirty(r)), None)
        if done is not None:
            return done, study
    return None


def folder_owner(folder: Path) -> str | None:
    """The config hash of the job `folder` belongs to: its identity file, else (a folder written before
    identity files existed) its result.json; None when no job has claimed it."""
    claim = folder / IDENTITY_FILE
    if claim.exists():
        owner = read_result(claim)
        if owner and owner.get("config_hash"):
            return str(owner["config_hash"])
        return f"unknown ({claim} unreadable)"
    record = read_result(folder / RESULT_FILE) if (folder / RESULT_FILE).is_file() else None
    return str(record["config_hash"]) if record and record.get("config_hash") else None


def claim_folder(folder: Path, identity: str) -> str | None:
    """Make `folder` the job `identity`'s (creating it); None when it is, else the hash of its job.

    The identity file is written aside and hard-linked into place, which fails if one exists, so of two jobs
    that claim one folder at once exactly one gets it and the other never sees half a file.
    """
    if folder_owner(folder) is None:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{IDENTITY_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"config_hash": identity}) + "\n")
            os.link(tmp, folder / IDENTITY_FILE)
        except FileExistsError:
            pass
        finally:
            Path(tmp).unlink(missing_ok=True)
    owner = folder_owner(folder)
    return None if owner == identity else owner


def place_job(root: Path, preferred: str, identity: str) -> str:
    """The folder under `root` (relative to it) for the job `identity` in a sweep: the one the job already
    owns, so that a sweep reordered or extended finds its finished jobs where they are; else `preferred`
    (Hydra's job number, or the layout's path) when no other job owns it; else `<preferred>-<hash[:8]>`.
    Only reads: Hydra and its sweepers may resolve a job's folder before deciding to run the job."""
    if root.is_dir():
        for claim in sorted(root.rglob(IDENTITY_FILE)):
            if folder_owner(claim.parent) == identity:
                return claim.parent.relative_to(root).as_posix()
        for path in find_result_files([root]):  # folders of jobs that ran before identity files existed
            if (not (path.parent / IDENTITY_FILE).exists() and identity.encode() in path.read_bytes()
                    and folder_owner(path.parent) == identity):
                return path.parent.relative_to(root).as_posix()
    return preferred if folder_owner(root / preferred) in (None, identity) else f"{preferred}-{identity[:8]}"


def load_records(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """All result records under `dirs` as one row each (nested `stats` and `options` flattened). A study
    folder (or its records.jsonl) gives its collected records; any other folder, the result.json files
    of the job folders below it."""
    rows = []
    job_dirs = []
    for d in map(Path, dirs):
        study = d if d.name == RECORDS_FILE else d / RECORDS_FILE
        if study.is_file():  # the calibration indices (1,024 ints a job) are for reproducing, not for tables
            problems: list[str] = []
            rows.extend({k: v for k, v in r.items() if k != "calib_indices"}
                        for r in read_records_file(study, problems))
            rows.extend({"status": UNREADABLE, "error": problem, "job_dir": str(study.parent)}
                        for problem in problems)
        else:
            job_dirs.append(d)
    for path in find_result_files(job_dirs):
        record = read_result(path)
        if record is None:
            rows.append({"status": UNREADABLE, "job_dir": str(path.parent),
                         "error": f"{path} is not a readable result record (JSON object)"})
            continue
        record["job_dir"] = str(path.parent)  # where the files are now (a result folder may have been moved)
        rows.append(record)
    if not rows:
        return pd.DataFrame()
    return pd.json_normalize(rows, sep=".")
