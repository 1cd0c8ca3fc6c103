"""Comparing what different methods pruned: mask overlap between jobs and per-layer sparsity plots.

`python -m ptsbench.masks JOB_DIR JOB_DIR [...] --out DIR` writes, for every pair of jobs on the same
model, the overlap (IoU) of their kept weights per layer and overall (`mask_overlap.csv`, `.md`), and per
model one chart with each job's per-layer sparsity (`layer_sparsity_<model>.png`). Jobs of several models
can be passed at once; pairs never cross models. Masks are read from the jobs' compact checkpoints
(`save_sparse=true`): a weight is kept where it is non-zero, which is what the audit counts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ptsbench.checkpoint import read_compact_form  # noqa: E402
from ptsbench.errors import PtsbenchError  # noqa: E402
from ptsbench.results import ALLOCATION_FILE, RESULT_FILE, save_figure, write_atomic, write_csv  # noqa: E402
from ptsbench.runner import COMPACT_MODEL_FILE  # noqa: E402

log = logging.getLogger(__name__)


def job_record(job: Path) -> dict:
    return json.loads((job / RESULT_FILE).read_text())


def job_label(job: Path) -> str:
    record = job_record(job)
    return f"{record.get('model')} {record.get('method')} @{record.get('target_sparsity')}"


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
        raise PtsbenchError(f"{job} has no {COMPACT_MODEL_FILE}: run the job with save_sparse=true to compare masks.")
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
    rows.append({"layer": "all", "params": sum(r["params"] for r in rows), "kept_a": sum(r["kept_a"] for r in rows),
                 "kept_b": sum(r["kept_b"] for r in rows), "iou": inter_all / union_all if union_all else 1.0})
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


def plot_layer_sparsity(jobs: Sequence[Path], path: Path) -> None:
    """One line per job: achieved sparsity of each prunable layer, in model order."""
    fig, ax = plt.subplots(figsize=(max(8, 0.25 * 60), 4.5))
    names: list[str] = []
    for job in jobs:
        table = pd.read_csv(job / ALLOCATION_FILE)
        names = names or table["name"].tolist()
        ax.plot(range(len(table)), table["achieved_sparsity"], marker=".", label=job_label(job))
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set(ylabel="layer sparsity", ylim=(0, 1.02), title=f"per-layer sparsity, {job_record(jobs[0]).get('model')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_mask_report(jobs: Sequence[Path], out: Path) -> pd.DataFrame:
    """mask_overlap.csv (per layer), mask_overlap.md (overall, one table per model), layer_sparsity_<model>.png."""
    groups = jobs_by_model(jobs)
    table = pairwise_overlap(groups)
    write_csv(out / "mask_overlap.csv", table)
    sections = ["# Mask overlap\n\nIoU of the kept weights, |A ∩ B| / |A ∪ B|, over all prunable weights; "
                "per-layer values in mask_overlap.csv, per-layer sparsity in layer_sparsity_<model>.png."]
    for model, rows in table[table["layer"] == "all"].groupby("model", sort=True):
        overall = rows[["job_a", "job_b", "kept_a", "kept_b", "iou"]]
        sections.append(f"## {model}\n\n" + overall.to_markdown(index=False, floatfmt=".4f"))
    write_atomic(out / "mask_overlap.md", "\n\n".join(sections) + "\n")
    for model, group in groups.items():
        plot_layer_sparsity(group, out / f"layer_sparsity_{model}.png")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptsbench.masks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", nargs="+", metavar="JOB_DIR", help="job directories (result.json + checkpoints)")
    parser.add_argument("--out", required=True, help="where to write mask_overlap.{csv,md} and layer_sparsity.png")
    parser.add_argument("--plot-only", metavar="PNG", help="only the per-layer sparsity chart, written to OUT/PNG "
                        "(needs just each job's allocation.csv, no checkpoints)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    jobs = [Path(j) for j in args.jobs]
    missing = [str(j) for j in jobs if not (j / RESULT_FILE).is_file()]
    if missing:
        print(f"ptsbench.masks: not a job directory (no {RESULT_FILE}): {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.plot_only:
        plot_layer_sparsity(jobs, Path(args.out) / args.plot_only)
        return 0
    try:
        write_mask_report(jobs, Path(args.out))
    except PtsbenchError as exc:
        print(f"ptsbench.masks: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
