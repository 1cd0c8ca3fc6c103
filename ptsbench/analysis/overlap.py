"""Which weights do methods keep? Mask overlap between jobs, and per-layer sparsity charts.

    python -m ptsbench.analysis.overlap RUN_DIR [RUN_DIR ...] --out results/mask_overlap
    python -m ptsbench.analysis.overlap --charts results/pts_methods --sparsity 0.9

The first form collects the jobs under the RUN_DIRs into the study OUT (records.jsonl, allocations.csv)
and writes, for every pair of jobs on the same model, the overlap (IoU) of their kept weights per layer
and overall (`mask_overlap.csv`, `.md`), and per model one chart with each job's per-layer sparsity
(`layer_sparsity_<model>.png`). Pairs never cross models. Masks are read from the jobs' compact
checkpoints (`save_sparse=true`, conf/experiment/mask_overlap.yaml), so this form needs the run folders:
a weight is kept where it is non-zero, which is what the audit counts.

The second form needs only a study: the per-layer sparsity charts at one sparsity
(`layer_sparsity_<model>_<sparsity>.png`) of the methods the mask_overlap experiment compares.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure  # no pyplot: no backend, no global figure state

from ptsbench.analysis import program
from ptsbench.analysis.study import (
    JOB_KEY,
    collect,
    experiment_algorithms,
    job_allocation,
    method_labels,
    study_allocations,
    study_records,
)
from ptsbench.checkpoint import read_compact_form
from ptsbench.errors import PtsbenchError
from ptsbench.results import (
    ALLOCATION_FILE,
    RESULT_FILE,
    find_result_files,
    save_figure,
    write_atomic,
    write_csv,
)
from ptsbench.runner import COMPACT_MODEL_FILE

log = logging.getLogger(__name__)

EXPERIMENT = "mask_overlap"  # its algorithm list also picks the methods of the per-layer charts


def job_record(job: Path) -> dict:
    return json.loads((job / RESULT_FILE).read_text())


def record_label(record: Mapping) -> str:
    return f"{record.get('model')} {record.get('method')} @{record.get('target_sparsity')}"


def job_label(job: Path) -> str:
    return record_label(job_record(job))


def jobs_by_model(jobs: Sequence[Path]) -> dict[str, list[Path]]:
    """The jobs grouped by their record's model, in the order given."""
    groups: dict[str, list[Path]] = {}
    for job in jobs:
        groups.setdefault(str(job_record(job).get("model")), []).append(job)
    return groups


def kept_masks(job: Path) -> dict[str, torch.Tensor]:
    """Per prunable layer (the job's allocation.csv), the boolean mask of kept weights."""
    compact, allocation = job / COMPACT_MODEL_FILE, job / ALLOCATION_FILE
    if not compact.is_file():
        raise PtsbenchError(f"{job} has no {COMPACT_MODEL_FILE}: run the job with save_sparse=true to "
                            "compare masks.")
    state = read_compact_form(compact)
    names = pd.read_csv(allocation)["name"].tolist()
    return {name: state[f"{name}.weight"] != 0 for name in names}


def mask_overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> pd.DataFrame:
    """IoU of the kept weights per layer and over all layers (row 'all'): |A & B| / |A | B|."""
    if set(a) != set(b):
        raise PtsbenchError(f"The two jobs prune different layers: {sorted(set(a) ^ set(b))[:6]} ...")
    rows, inter_all, union_all = [], 0, 0
    for name in a:
        if a[name].shape != b[name].shape:
            raise PtsbenchError(f"Layer {name} has shape {tuple(a[name].shape)} in one job and "
                                f"{tuple(b[name].shape)} in the other: not the same model.")
        inter, union = int((a[name] & b[name]).sum()), int((a[name] | b[name]).sum())
        rows.append({"layer": name, "params": a[name].numel(), "kept_a": int(a[name].sum()),
                     "kept_b": int(b[name].sum()), "iou": inter / union if union else 1.0})
        inter_all, union_all = inter_all + inter, union_all + union
    rows.append({"layer": "all", "params": sum(r["params"] for r in rows),
                 "kept_a": sum(r["kept_a"] for r in rows),
                 "kept_b": sum(r["kept_b"] for r in rows),
                 "iou": inter_all / union_all if union_all else 1.0})
    return pd.DataFrame(rows)


def pairwise_overlap(groups: Mapping[str, Sequence[Path]]) -> pd.DataFrame:
    """Per-layer and overall IoU for every pair of jobs within each model's group (`jobs_by_model`), with
    columns model, job_a, job_b added."""
    tables = []
    for model, group in groups.items():
        if len(group) < 2:  # nothing to pair it with: its checkpoints are not even read
            continue
        masks = {job: kept_masks(job) for job in group}
        labels = {job: job_label(job) for job in group}
        for ja, jb in itertools.combinations(group, 2):
            t = mask_overlap(masks[ja], masks[jb])
            t.insert(0, "job_b", labels[jb])
            t.insert(0, "job_a", labels[ja])
            t.insert(0, "model", model)
            tables.append(t)
    if not tables:
        jobs = [job for group in groups.values() for job in group]
        raise PtsbenchError(f"No two jobs on the same model to compare: {', '.join(map(job_label, jobs))}.")
    return pd.concat(tables, ignore_index=True)


def plot_layer_sparsity(tables: Mapping[str, pd.DataFrame], title: str, path: Path) -> None:
    """One line per job (label -> its allocation table): achieved sparsity of each prunable layer, in model
    order."""
    fig = Figure(figsize=(max(8, 0.25 * 60), 4.5))
    ax = fig.subplots()
    names: list[str] = []
    for label, table in tables.items():
        names = names or table["name"].tolist()
        ax.plot(range(len(table)), table["achieved_sparsity"], marker=".", label=label)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set(ylabel="layer sparsity", ylim=(0, 1.02), title=f"per-layer sparsity, {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def layer_tables(study: Path, records: pd.DataFrame) -> dict[str, dict[str, pd.DataFrame]]:
    """model -> {job label -> allocation table} for `records` (rows of the study's records), in their
    order."""
    allocations = study_allocations(study)
    tables: dict[str, dict[str, pd.DataFrame]] = {}
    for _, record in records.iterrows():
        table = job_allocation(allocations, record[JOB_KEY])
        tables.setdefault(str(record["model"]), {})[record_label(record)] = table
    return tables


def write_layer_charts(study: Path, sparsity: float, methods: Sequence[str], out: Path,
                       seed: int = 0) -> list[Path]:
    """layer_sparsity_<model>_<sparsity>.png per model of the study: the finished jobs of `methods` (labels)
    at `sparsity` and `seed`, one line each."""
    records = study_records(study)
    if records.empty:
        raise PtsbenchError(f"{study} holds no records: collect the study first.")
    rows = records[(records["status"] == "ok") & ((records["target_sparsity"] - sparsity).abs() < 1e-9)
                   & (records["seed"] == seed) & records["method"].isin(list(methods))]
    if rows.empty:
        raise PtsbenchError(f"{study} has no finished job of {list(methods)} at sparsity {sparsity:g}, seed "
                            f"{seed}.")
    paths = []
    firsts = rows.sort_values(["model", "method"]).drop_duplicates(["model", "method"])
    for model, tables in layer_tables(study, firsts).items():
        paths.append(out / f"layer_sparsity_{model}_{sparsity:g}.png")
        plot_layer_sparsity(tables, f"{model} at {sparsity:g}", paths[-1])
    return paths


def write_mask_report(runs: Sequence[Path], out: Path) -> pd.DataFrame:
    """The study `out` collected from the jobs under `runs`, with mask_overlap.csv (per layer),
    mask_overlap.md (overall, one table per model) and layer_sparsity_<model>.png."""
    table = pairwise_overlap(jobs_by_model([path.parent for path in find_result_files(runs)]))
    collect(runs, out)
    write_csv(out / "mask_overlap.csv", table)
    sections = ["# Mask overlap\n\nIoU of the kept weights, |A ∩ B| / |A ∪ B|, over all prunable weights; "
                "per-layer values in mask_overlap.csv, per-layer sparsity in layer_sparsity_<model>.png."]
    for model, rows in table[table["layer"] == "all"].groupby("model", sort=True):
        overall = rows[["job_a", "job_b", "kept_a", "kept_b", "iou"]]
        sections.append(f"## {model}\n\n" + overall.to_markdown(index=False, floatfmt=".4f"))
    write_atomic(out / "mask_overlap.md", "\n\n".join(sections) + "\n")
    for model, tables in layer_tables(out, study_records(out)).items():
        plot_layer_sparsity(tables, model, out / f"layer_sparsity_{model}.png")
    return table


@program("python -m ptsbench.analysis.overlap")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptsbench.analysis.overlap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR",
                        help="folders of jobs run with save_sparse=true")
    parser.add_argument("--out", help="the study folder (default with --charts: the study itself)")
    parser.add_argument("--charts", metavar="STUDY",
                        help="only the per-layer sparsity charts, from this study")
    parser.add_argument("--sparsity", type=float, help="with --charts: the target sparsity to chart")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.charts:
        if args.sparsity is None or args.runs:
            parser.error("--charts STUDY takes --sparsity and no RUN_DIR")
        methods = method_labels(experiment_algorithms(EXPERIMENT)).values()
        write_layer_charts(Path(args.charts), args.sparsity, list(methods), Path(args.out or args.charts))
        return 0
    if not args.runs or not args.out:
        parser.error("give RUN_DIR ... and --out (or --charts STUDY --sparsity S)")
    write_mask_report([Path(r) for r in args.runs], Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
