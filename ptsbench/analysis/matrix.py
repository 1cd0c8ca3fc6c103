"""The PTSBench technique matrix: allocation x reconstruction, with learned allocations cross-applied.

For each model and sparsity, magnitude masks are built from the heuristic allocations and from the
learned methods' own per-layer sparsities (read from the source study's allocations.csv), each with
BatchNorm re-estimation and then each reconstruction mode; the sparsegpt column prunes the same allocation
with SparseGPT's second-order weight update instead (then BatchNorm re-estimation). Comparing a learned
method's own row with "its allocation + magnitude masks" and "+ reconstruction" says whether its gain
comes from where it prunes or from how it repairs. Which allocations, which algorithm and which source
study: conf/study/technique_matrix.yaml.

    python -m ptsbench.analysis.matrix --source results/pts_methods --runs runs/technique_matrix \\
        --out results/technique_matrix [--models resnet18] [--sparsities 0.8 0.9] [-- overrides ...]

Every job runs through the harness runner (audited, timed, resumable: finished jobs are skipped) into
RUNS/<model>/<sparsity>/<allocation>-<reconstruction>/; a learned allocation is first written there as a
per-layer csv named after its source job. The runs are then collected into the study OUT
(records.jsonl, allocations.csv), whose tables are rebuilt from it alone: results.csv/md as for any
study, and technique_matrix.md with one row per (model, sparsity, allocation), one top-1 column per
reconstruction, next to the learned methods' own top-1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from ptsbench.analysis import program
from ptsbench.analysis.report import write_report
from ptsbench.analysis.study import (
    JOB_KEY,
    check_names,
    collect,
    experiment_grid,
    job_allocation,
    method_labels,
    study_allocations,
    study_config,
    study_records,
)
from ptsbench.errors import ConfigError, unknown_choice
from ptsbench.results import RECORDS_FILE, write_atomic, write_csv
from ptsbench.toolkit.allocations import weight_only_allocations
from ptsbench.toolkit.reconstruct import RECONSTRUCTIONS

log = logging.getLogger(__name__)

STUDY = "technique_matrix"
# The reconstruction columns: the harness's units (ptsbench.toolkit.reconstruct) and SparseGPT's own weight
# update, whose cells run the study's `sparsegpt_algorithm` on the same allocation instead of magnitude masks.
MATRIX_RECONSTRUCTIONS = (*RECONSTRUCTIONS, "sparsegpt")


@dataclass(frozen=True)
class MatrixSettings:
    """conf/study/technique_matrix.yaml, checked: the one place the matrix's lists are written."""

    source: str
    algorithm: str
    heuristic: tuple[str, ...]
    learned: tuple[str, ...]  # algorithm configs whose allocations are replayed
    sparsegpt_algorithm: str = "sparsegpt_bn"  # the algorithm config of the sparsegpt column

    @classmethod
    def from_config(cls, cfg: DictConfig) -> MatrixSettings:
        where = f"conf/study/{STUDY}.yaml"
        for key in ("source", "algorithm", "heuristic", "learned"):
            if cfg.get(key) is None:
                raise ConfigError(f"{where} lacks the key {key!r}.")
        heuristic = tuple(str(a) for a in cfg.heuristic)
        known = weight_only_allocations()
        for name in heuristic:
            if name not in known:
                raise unknown_choice(f"allocation in {where} heuristic:", name, known)
        return cls(str(cfg.source), check_names(f"{where} algorithm", [cfg.algorithm])[0], heuristic,
                   tuple(check_names(f"{where} learned", cfg.learned)),
                   check_names(f"{where} sparsegpt_algorithm",
                               [cfg.get("sparsegpt_algorithm", "sparsegpt_bn")])[0])

    @property
    def allocations(self) -> tuple[str, ...]:
        return (*self.heuristic, *self.learned)


def load_settings() -> MatrixSettings:
    return MatrixSettings.from_config(study_config(STUDY))


@dataclass(frozen=True)
class ModelInfo:
    """A model config as the records name it (`mobilenetv2` records `mobilenetv2_100`), its seed and
    sweep sparsities under the given overrides."""

    group: str
    name: str
    seed: int
    sweep_sparsities: tuple[float, ...]


def model_info(group: str, overrides: Sequence[str] = ()) -> ModelInfo:
    from ptsbench.config import compose_job_config

    cfg = compose_job_config([f"model={group}", *overrides])
    return ModelInfo(group, str(cfg.model.name), int(cfg.seed),
                     tuple(float(s) for s in (cfg.model.get("sweep_sparsities") or ())))


def source_job(records: pd.DataFrame, model: str, sparsity: float, method: str,
               seeds: Iterable[int] | None = None) -> pd.Series | None:
    """The finished job of `model` at `sparsity` with method label `method`, of one of `seeds` if given
    (other seeds' runs learn other allocations); the most recent if several, None if none."""
    if records.empty:
        return None
    rows = records[(records["model"] == model) & (records["status"] == "ok") & (records["method"] == method)
                   & ((records["target_sparsity"] - sparsity).abs() < 1e-9)]
    if seeds is not None:
        rows = rows[rows["seed"].isin(list(seeds))]
    return None if rows.empty else rows.sort_values("finished_at").iloc[-1]


@dataclass(frozen=True)
class Cell:
    allocation: str
    reconstruction: str
    model_group: str
    job_dir: Path
    overrides: tuple[str, ...]
    source_allocation: pd.DataFrame | None = None  # a learned allocation, written to allocation_file first
    allocation_file: Path | None = None


def matrix_cells(settings: MatrixSettings, records: pd.DataFrame, allocations: pd.DataFrame, model: ModelInfo,
                 sparsity: float, runs: Path, labels: Mapping[str, str], wanted: Sequence[str] | None = None,
                 reconstructions: Sequence[str] = MATRIX_RECONSTRUCTIONS) -> list[Cell]:
    """Every cell of one model and sparsity; a learned allocation without a source job of the model's
    seed is skipped with a warning. `labels`: learned algorithm config -> its method label."""
    wanted = list(wanted or settings.allocations)
    for name in wanted:
        if name not in settings.allocations:
            raise unknown_choice("matrix allocation", name, settings.allocations)
    for recon in reconstructions:
        if recon not in MATRIX_RECONSTRUCTIONS:
            raise unknown_choice("reconstruction", recon, MATRIX_RECONSTRUCTIONS)
    cells = []
    for name in wanted:
        source = None
        if name in settings.learned:
            source = source_job(records, model.name, sparsity, labels[name], [model.seed])
            if source is None:
                log.warning("no %s job for %s at %g (seed %d) in the source study: its allocation row is "
                            "skipped",
                            name, model.name, sparsity, model.seed)
                continue
        for recon in reconstructions:
            job_dir = runs / model.group / f"{sparsity:g}" / f"{name}-{recon}"
            base = ((f"algorithm={settings.sparsegpt_algorithm}",
                     f"sparsity={sparsity}") if recon == "sparsegpt" else
                    (f"algorithm={settings.algorithm}", f"sparsity={sparsity}",
                     f"algorithm.reconstruction.mode={recon}"))
            if source is None:
                cells.append(Cell(name, recon, model.group, job_dir, (*base, f"algorithm.allocation={name}")))
                continue
            # named after the source job, so a changed source gives another path, hence another config hash
            path = job_dir / f"allocation_from_{source[JOB_KEY]}.csv"
            cells.append(Cell(name, recon, model.group, job_dir, (
                *base, "algorithm.allocation=from_file", f"algorithm.allocation_file={path.resolve()}",
                f"algorithm.allocation_label={name}"), job_allocation(allocations, source[JOB_KEY]), path))
    return cells


def cell_allocation(table: pd.DataFrame) -> pd.Series:
    """Each matrix record's allocation: the learned config it replays, else the heuristic strategy."""
    def column(name: str, default: str) -> pd.Series:
        key = f"algorithm_options.{name}"  # load_records flattens the nested options
        return table[key].fillna(default) if key in table else pd.Series(default, index=table.index)

    label = column("allocation_label", "")
    return label.where(label != "", column("allocation", ""))


def cell_reconstruction(table: pd.DataFrame) -> pd.Series:
    """Each matrix record's column: its reconstruction mode, or sparsegpt for the SparseGPT cells."""
    key = "algorithm_options.reconstruction"
    mode = table[key].fillna("none") if key in table else pd.Series("none", index=table.index)
    return mode.where(table["algorithm"] != "sparsegpt", "sparsegpt") if "algorithm" in table else mode


def pivot(table: pd.DataFrame, source: pd.DataFrame, labels: Mapping[str, str]) -> str:
    """technique_matrix.md: top-1 per (model, sparsity, allocation) x reconstruction, plus wall time and
    the learned methods' own top-1 (`labels`: learned config -> method label) for comparison."""
    if table.empty:
        return "# Technique matrix\n\n(no result files)\n"
    ok = table[table["status"] == "ok"].copy()
    if ok.empty:
        return "# Technique matrix\n\n(no finished jobs)\n"
    ok["allocation"] = cell_allocation(ok)
    ok["reconstruction"] = cell_reconstruction(ok)
    keys = ["model", "target_sparsity", "allocation"]
    top1 = ok.pivot_table(index=keys, columns="reconstruction", values="top1")
    secs = ok.pivot_table(index=keys, columns="reconstruction", values="prune_seconds")
    out = top1.reindex(columns=[r for r in MATRIX_RECONSTRUCTIONS if r in top1.columns]).round(2)
    out.columns = [f"top-1 {c}" for c in out.columns]
    for c in [r for r in MATRIX_RECONSTRUCTIONS if r in secs.columns]:
        out[f"s {c}"] = secs[c].round(1)
    own = []
    for model, sparsity, allocation in out.index:  # the job whose allocation the row replays
        job = source_job(source, model, sparsity, labels[allocation], ok["seed"].unique()) \
            if allocation in labels else None
        own.append(None if job is None else round(float(job["top1"]), 2))
    out["method's own top-1"] = own
    dense = ok.groupby("model")["dense_top1"].first().round(2)
    lines = ["# Technique matrix: allocation x reconstruction", "",
             "Magnitude masks from each allocation, BatchNorm re-estimated, then each reconstruction mode "
             "(the settings of the matrix's algorithm config). Rows named after a learned method's config "
             f"use that method's own per-layer sparsities ({', '.join(f'`{a}`' for a in labels)}: their "
             "jobs' allocation in the source study); the last column is the method itself (its own masks and "
             "training). `s` = pruning wall seconds on the machine that ran it.", "",
             "Dense top-1: " + ", ".join(f"{m} {v}" for m, v in dense.items()), "",
             out.reset_index().to_markdown(index=False, floatfmt=".4g"), ""]
    return "\n".join(lines)


def source_records(sources: Sequence[Path]) -> pd.DataFrame:
    """The records of the source studies together (the learned jobs whose allocations are replayed)."""
    frames = [f for f in map(study_records, sources) if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_tables(out: Path, source: pd.DataFrame, settings: MatrixSettings) -> pd.DataFrame:
    """results.{csv,md}, the plot and technique_matrix.md, from the study `out` and the source studies'
    records."""
    table = write_report([out], out)
    labels = method_labels(settings.learned)
    write_atomic(out / "technique_matrix.md", pivot(study_records(out), source, labels))
    return table


def cell_extra(cell: Cell, extra: Sequence[str]) -> list[str]:
    """The extra overrides one cell takes: `algorithm.reconstruction.*` reaches the reconstruction cells
    only, since the sparsegpt column's algorithm has no reconstruction node to set."""
    if cell.reconstruction != "sparsegpt":
        return list(extra)
    return [o for o in extra if not o.lstrip("+~").startswith("algorithm.reconstruction.")]


def run_cells(cells: Sequence[Cell], extra: Sequence[str]) -> int:
    """Compose every cell first (a bad override fails before any job runs), then run them; the number
    that failed."""
    from ptsbench.config import compose_job_config
    from ptsbench.errors import FolderTaken
    from ptsbench.runner import JobFailed, run_job

    configs = [compose_job_config([f"model={cell.model_group}", "resume=true", f"experiment_name={STUDY}",
                                   *cell.overrides, *cell_extra(cell, extra)]) for cell in cells]
    failed = 0
    for cell, cfg in zip(cells, configs, strict=True):
        if cell.allocation_file is not None:
            write_csv(cell.allocation_file, cell.source_allocation)
        try:
            run_job(cfg, cell.job_dir, sweep=STUDY)
        except (JobFailed, FolderTaken) as exc:  # a folder of another job is left as it is
            failed += 1
            log.error("%s failed: %s", cell.job_dir, exc)
    return failed


@program("python -m ptsbench.analysis.matrix")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptsbench.analysis.matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, nargs="+",
                        help="the studies holding the learned jobs (results/<source> ...)")
    parser.add_argument("--runs", default=f"runs/{STUDY}", help="where the jobs run (default: %(default)s)")
    parser.add_argument("--out", required=True, help="the study folder to collect the runs into")
    parser.add_argument("--models", nargs="+", help="model configs (default: the source experiment's)")
    parser.add_argument("--sparsities", nargs="+", type=float, help="default: each model's sweep_sparsities")
    parser.add_argument("--allocations", nargs="+", help="a subset of the study config's allocations")
    parser.add_argument("--reconstructions", nargs="+", default=list(MATRIX_RECONSTRUCTIONS),
                        help="a subset of %(default)s")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: collect RUNS (if it exists) and rebuild the tables")
    parser.add_argument("--add", action="store_true",
                        help="keep the jobs OUT already holds and add RUNS' beside them")
    parser.add_argument("overrides", nargs="*",
                        help="extra Hydra overrides for every job (e.g. threads=1); "
                             "algorithm.reconstruction.* skips the sparsegpt cells")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sources, runs, out = [Path(s) for s in args.source], Path(args.runs), Path(args.out)
    settings = load_settings()
    records = source_records(sources)
    failed = 0
    if not args.report_only:
        allocations = pd.concat([study_allocations(s) for s in sources], ignore_index=True)
        labels = method_labels(settings.learned)
        cells = []
        for group in args.models or experiment_grid(settings.source)["model"]:
            model = model_info(group, args.overrides)
            if not (args.sparsities or model.sweep_sparsities):
                raise ConfigError(f"model={group} lists no sweep_sparsities: give --sparsities.")
            for sparsity in args.sparsities or model.sweep_sparsities:
                cells += matrix_cells(settings, records, allocations, model, sparsity, runs, labels,
                                      args.allocations, args.reconstructions)
        failed = run_cells(cells, args.overrides)
    if runs.exists() or not args.report_only or not (out / RECORDS_FILE).is_file():
        collect([runs], out, add=args.add)  # with neither RUNS nor a collected OUT this names RUNS as missing
    write_tables(out, records, settings)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
