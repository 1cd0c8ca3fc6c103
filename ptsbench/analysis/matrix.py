"""The PTSBench technique matrix: allocation x reconstruction, with learned allocations cross-applied.

For each model and sparsity, magnitude masks are built from five allocations, uniform, ERK, global,
FCPTS's learned one and UniPTS's searched one (read from those jobs' allocation.csv, found in the
source result directories), each with BatchNorm re-estimation and then no reconstruction, layer-wise or
block-wise reconstruction. Comparing a learned method's own row with "its allocation + magnitude
masks" and "+ reconstruction" says whether its gain comes from where it prunes or from how it repairs.

    python -m ptsbench.matrix --source results/pts_methods --out results/technique_matrix \\
        --models resnet18 --sparsities 0.8 0.9 [--cache-dir DIR] [overrides ...]

Every job runs through the harness runner (audited, timed, resumable: finished jobs are skipped), into
OUT/<model>/<sparsity>/<allocation>-<reconstruction>/. The tables are rebuilt from the result files:
results.csv/md as for any sweep, and technique_matrix.md with one row per (model, sparsity, allocation)
and one top-1 column per reconstruction, next to the learned methods' own top-1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from ptsbench.errors import PtsbenchError
from ptsbench.report import write_report
from ptsbench.results import ALLOCATION_FILE, load_records, write_atomic
from ptsbench.runner import JobFailed, run_job

log = logging.getLogger(__name__)

HEURISTIC = ("uniform", "erk", "global")
LEARNED = {"fcpts": "fcpts-ste-kde", "unipts": "unipts"}  # allocation name -> method label of its source job
RECONSTRUCTIONS = ("none", "layer", "block")


def is_method(labels: pd.Series, base: str) -> pd.Series:
    """Labels equal to `base`, or `base` plus only an iteration-count suffix ("fcpts-ste-kde-64it"):
    ablations ("unipts-kl", "unipts-nodst") are other methods."""
    labels = labels.astype(str)
    suffix = labels.str.slice(len(base) + 1)
    return (labels == base) | (labels.str.startswith(base + "-") & suffix.str.fullmatch(r"\d+it"))


def source_job(records: pd.DataFrame, model: str, sparsity: float, prefix: str,
               seeds: Iterable[int] | None = None) -> pd.Series | None:
    """The finished source job of `model` at `sparsity` whose method is `prefix` (plus at most an
    iteration-count suffix), of one of `seeds` if given (other seeds' runs learn other allocations); the
    most recent if several, None if none."""
    if records.empty:
        return None
    rows = records[(records["model"] == model) & (records["status"] == "ok")
                   & ((records["target_sparsity"] - sparsity).abs() < 1e-9) & is_method(records["method"], prefix)]
    if seeds is not None:
        rows = rows[rows["seed"].isin(list(seeds))]
    return None if rows.empty else rows.sort_values("finished_at").iloc[-1]


def learned_allocation(records: pd.DataFrame, model: str, sparsity: float, prefix: str,
                       seed: int | None = None) -> Path | None:
    """allocation.csv of `source_job(...)` for seed `seed` (any seed if None)."""
    job = source_job(records, model, sparsity, prefix, None if seed is None else [seed])
    if job is None:
        return None
    path = Path(job["job_dir"]) / ALLOCATION_FILE
    return path if path.is_file() else None


def matrix_jobs(records: pd.DataFrame, model: str, sparsity: float, allocations: Sequence[str] | None = None,
                reconstructions: Sequence[str] = RECONSTRUCTIONS, seed: int | None = None
                ) -> list[tuple[str, str, list[str]]]:
    """(allocation name, reconstruction, overrides) for every cell of one model (named as the records name
    it, see `job_identity`) and sparsity; the learned allocations come from the source jobs of `seed`
    (any seed if None)."""
    wanted = set(allocations or (*HEURISTIC, *LEARNED))
    unknown = wanted - {*HEURISTIC, *LEARNED}
    if unknown:
        raise PtsbenchError(f"Unknown matrix allocation(s) {sorted(unknown)}; allowed: {[*HEURISTIC, *LEARNED]}.")
    bad = set(reconstructions) - set(RECONSTRUCTIONS)
    if bad:
        raise PtsbenchError(f"Unknown reconstruction(s) {sorted(bad)}; allowed: {list(RECONSTRUCTIONS)}.")
    allocations = [(a, [f"algorithm.allocation={a}"]) for a in HEURISTIC if a in wanted]
    for name, prefix in LEARNED.items():
        if name not in wanted:
            continue
        path = learned_allocation(records, model, sparsity, prefix, seed)
        if path is None:
            log.warning("no %s job for %s at %g in the source results: its allocation row is skipped", name, model,
                        sparsity)
            continue
        allocations.append((name, ["algorithm.allocation=from_file", f"algorithm.allocation_file={path.resolve()}",
                                   f"algorithm.allocation_label={name}"]))
    return [(name, recon, ["algorithm=magnitude_recon_quick", f"algorithm.reconstruction={recon}", *alloc])
            for name, alloc in allocations for recon in reconstructions]


def job_identity(model: str, overrides: Sequence[str] = ()) -> tuple[str, int]:
    """(model name as the result records hold it, seed) of the jobs `model=<model> *overrides` compose
    to: the config group `mobilenetv2` records its timm name `mobilenetv2_100`."""
    from ptsbench.cli import compose_job_config

    cfg = compose_job_config([f"model={model}", *overrides])
    return str(cfg.model.name), int(cfg.seed)


def pivot(table: pd.DataFrame, source: pd.DataFrame) -> str:
    """technique_matrix.md: top-1 per (model, sparsity, allocation) x reconstruction, plus wall time and
    the learned methods' own top-1 for comparison."""
    if table.empty:
        return "# Technique matrix\n\n(no result files)\n"
    ok = table[table["status"] == "ok"].copy()
    if ok.empty:
        return "# Technique matrix\n\n(no finished jobs)\n"
    def column(name: str, default: str) -> pd.Series:
        key = f"algorithm_options.{name}"  # load_records flattens the nested options
        return ok[key].fillna(default) if key in ok else pd.Series(default, index=ok.index)

    label = column("allocation_label", "")
    ok["allocation"] = label.where(label != "", column("allocation", ""))
    ok["reconstruction"] = column("reconstruction", "none")
    top1 = ok.pivot_table(index=["model", "target_sparsity", "allocation"], columns="reconstruction", values="top1")
    secs = ok.pivot_table(index=["model", "target_sparsity", "allocation"], columns="reconstruction",
                          values="prune_seconds")
    out = top1.reindex(columns=[r for r in RECONSTRUCTIONS if r in top1.columns]).round(2)
    out.columns = [f"top-1 {c}" for c in out.columns]
    for c in [r for r in RECONSTRUCTIONS if r in secs.columns]:
        out[f"s {c}"] = secs[c].round(1)
    own = []
    for model, sparsity, allocation in out.index:  # the job whose allocation the row replays
        job = source_job(source, model, sparsity, LEARNED[allocation], ok["seed"].unique()) \
            if allocation in LEARNED else None
        own.append(None if job is None else round(float(job["top1"]), 2))
    out["method's own top-1"] = own
    dense = ok.groupby("model")["dense_top1"].first().round(2)
    lines = ["# Technique matrix: allocation x reconstruction", "",
             "Magnitude masks from each allocation, BatchNorm re-estimated, then no / layer-wise / block-wise "
             "reconstruction (200 Adam steps per unit, lr 1e-4 weights, 1e-3 biases; dense inputs). "
             "`fcpts` and `unipts` rows use those methods' own per-layer sparsities (allocation.csv of their "
             "jobs); the last column is the method itself (its own masks and training). `s` = pruning wall "
             "seconds on the machine that ran it.", "",
             "Dense top-1: " + ", ".join(f"{m} {v}" for m, v in dense.items()), "",
             out.reset_index().to_markdown(index=False, floatfmt=".4g"), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptsbench.matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", nargs="*", default=[], help="result dirs holding the FCPTS / UniPTS jobs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", default=["resnet18"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9])
    parser.add_argument("--allocations", nargs="+", help=f"subset of {[*HEURISTIC, *LEARNED]} (default: all)")
    parser.add_argument("--reconstructions", nargs="+", default=list(RECONSTRUCTIONS), help="subset of none layer block")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tables from OUT")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job (e.g. cache_dir=...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    source = load_records([Path(s) for s in args.source]) if args.source else pd.DataFrame()
    failed = 0
    if not args.report_only:
        from ptsbench.cli import compose_job_config  # Hydra's compose API with the harness's config dir

        for model in args.models:
            name, seed = job_identity(model, args.overrides)
            for sparsity in args.sparsities:
                try:
                    cells = matrix_jobs(source, name, sparsity, args.allocations, args.reconstructions, seed)
                except PtsbenchError as exc:
                    print(f"ptsbench.matrix: {exc}", file=sys.stderr)
                    return 2
                for name, recon, overrides in cells:
                    job_dir = out / model / f"{sparsity:g}" / f"{name}-{recon}"
                    cfg = compose_job_config([f"model={model}", f"sparsity={sparsity}", "resume=true",
                                              "experiment_name=technique_matrix", *overrides, *args.overrides])
                    try:
                        run_job(cfg, job_dir, sweep="technique_matrix")
                    except JobFailed as exc:
                        failed += 1
                        log.error("%s %g %s-%s failed: %s", model, sparsity, name, recon, exc)
                    except PtsbenchError as exc:
                        print(f"ptsbench.matrix: {exc}", file=sys.stderr)
                        return 2
    write_report([out], out)
    write_atomic(out / "technique_matrix.md", pivot(load_records([out]), source))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
