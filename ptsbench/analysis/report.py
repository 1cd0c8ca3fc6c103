"""Tables and plots from result files: `ptsbench-report DIR [DIR ...]` rebuilds what a sweep leaves, and
adds top-1 against pruning cost with its Pareto fronts (pareto.{md,csv,png}, ptsbench/analysis/pareto.py);
`--reference` adds the comparison with the published numbers (ptsbench/analysis/reference.py)."""

from __future__ import annotations

import argparse
import fnmatch
import logging
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no backend, no global figure state
from matplotlib.lines import Line2D

from ptsbench.analysis import program
from ptsbench.analysis.pareto import write_pareto
from ptsbench.analysis.plotting import legend_columns, method_styles
from ptsbench.analysis.reference import REFERENCE_CSV, write_reference_comparison
from ptsbench.analysis.study import method_family, study_config
from ptsbench.errors import DataError
from ptsbench.results import UNREADABLE, load_records, save_figure, write_atomic, write_csv

log = logging.getLogger(__name__)

TABLE_COLUMNS = [
    "model", "dataset", "method", "target_sparsity", "achieved_sparsity", "achieved_sparsity_all",
    "effective_sparsity", "dense_dead_fraction", "dense_top1", "top1", "top5", "top1_drop", "prune_seconds",
    "forward_passes", "backward_passes",
    "peak_memory_mb", "macs_dense", "macs_sparse", "speed", "calib_images", "calib_seed", "seed",
    "status", "error", "job_dir",
]
MD_COLUMNS = {
    "model": "model", "method": "method", "target_sparsity": "target", "achieved_sparsity": "achieved",
    "achieved_sparsity_all": "achieved (all params)", "effective_sparsity": "effective",
    "dense_top1": "dense top-1", "top1": "top-1",
    "top5": "top-5", "prune_seconds": "prune s", "seed": "seed", "status": "status",
}
SORT_KEYS = ["model", "method", "target_sparsity", "seed"]
# Recorded only on probe data sets (data.probe): shown after top-5 when any job has them.
PROBE_COLUMNS = {"agreement_top1": "agrees w/ dense %", "kl_dense_sparse": "KL(dense‖sparse)"}
# Measured by the harness since the cost accounting (ptsbench/cost.py): shown after the pruning time when
# any job has them, so tables of older records keep their shape.
COST_COLUMNS = {"forward_passes": "fwd images", "backward_passes": "bwd images", "peak_memory_mb": "peak MiB",
                "speed": "speed"}


def name_calibration_sizes(df: pd.DataFrame) -> pd.Series:
    """Method labels with '-n<images>' where one method ran on one cell with several calibration sizes (the
    one-shot methods' budget knob), so that those jobs stay apart in every table instead of being averaged
    as seeds; the method family, which the Pareto view joins, stays as it is."""
    calib = pd.to_numeric(df["calib_images"], errors="coerce")
    cell = [df["model"].astype(str), df["method"].astype(str), df["target_sparsity"].astype(str)]
    several = calib.groupby(cell, dropna=False).transform("nunique") > 1
    tagged = df["method"].astype(str) + "-n" + calib.astype("Int64").astype(str)
    return df["method"].where(~several, tagged)


def results_table(records: pd.DataFrame) -> pd.DataFrame:
    """One row per job with the columns of TABLE_COLUMNS, sorted by model, method, sparsity, seed."""
    if records.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    df = records.copy()
    if "method" not in df:
        df["method"] = df.get("algorithm_label", df.get("algorithm"))
    for col in TABLE_COLUMNS:
        if col not in df:
            df[col] = None
    df["top1_drop"] = (pd.to_numeric(df["dense_top1"], errors="coerce")
                       - pd.to_numeric(df["top1"], errors="coerce"))
    df["method"] = name_calibration_sizes(df)
    extra = [c for c in df.columns if c not in TABLE_COLUMNS]
    df = df[TABLE_COLUMNS + extra]
    return df.sort_values(SORT_KEYS, na_position="last", kind="stable").reset_index(drop=True)


def probe_rows(table: pd.DataFrame) -> pd.Series:
    """Jobs evaluated on a probe set: those that recorded agreement with the dense model."""
    if "agreement_top1" not in table:
        return pd.Series(False, index=table.index)
    return pd.to_numeric(table["agreement_top1"], errors="coerce").notna()


def markdown_table(table: pd.DataFrame) -> str:
    columns = dict(MD_COLUMNS)
    # records older than the audit's
    if pd.to_numeric(table["effective_sparsity"], errors="coerce").isna().all():
        columns.pop("effective_sparsity")
    if probe_rows(table).any():
        at = list(columns).index("top5") + 1
        items = list(columns.items())
        columns = dict(items[:at] + [(c, n) for c, n in PROBE_COLUMNS.items() if c in table] + items[at:])
    if table["forward_passes"].notna().any():
        at = list(columns).index("prune_seconds") + 1
        items = list(columns.items())
        columns = dict(items[:at] + list(COST_COLUMNS.items()) + items[at:])
    shown = table[list(columns)].rename(columns=columns)
    failed = table["status"] != "ok"
    if failed.any():
        shown.loc[failed, "status"] = [
            f"**{s}**: {str(e).splitlines()[0][:120] if isinstance(e, str) else ''}"
            for s, e in zip(table.loc[failed, "status"], table.loc[failed, "error"], strict=True)
        ]
    return shown.to_markdown(index=False, floatfmt=".4g")


def seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds for each (model, method, target sparsity)."""
    ok = table[table["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame()
    agg = ok.groupby(["model", "method", "target_sparsity"], dropna=False).agg(
        top1_mean=("top1", "mean"), top1_std=("top1", "std"), achieved_sparsity=("achieved_sparsity", "mean"),
        dense_top1=("dense_top1", "mean"), prune_seconds=("prune_seconds", "mean"), seeds=("seed", "nunique"),
    )
    return agg.reset_index()


def heuristic_families() -> list[str]:
    """The heuristics whose best sets a cell's headroom (conf/study/claims.yaml `heuristics`)."""
    return [method_family(name) for name in study_config("claims").heuristics]


def headroom_rows(summary: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Per model and target sparsity: dense top-1 minus the best heuristic's mean (what any method can
    gain)."""
    families = (table.drop_duplicates("method").set_index("method")["method_family"]
                if "method_family" in table else pd.Series(dtype=object))
    heur = summary[summary["method"].map(families).isin(heuristic_families())]
    if heur.empty:
        return pd.DataFrame()
    best = (heur.groupby(["model", "target_sparsity"])
            .agg(top=("top1_mean", "max"), dense=("dense_top1", "mean")))
    return (best["dense"] - best["top"]).rename("headroom").reset_index()


def by_sparsity(summary: pd.DataFrame, headroom: pd.DataFrame | None = None) -> str:
    """Markdown from `seed_summary`: one row per (model, method), one column per target sparsity: top-1
    (mean over seeds, with the number of seeds when more than one), then the mean pruning wall seconds."""
    if summary.empty:
        return ""

    def cell(row: pd.Series) -> str:
        return f"{row.top1_mean:.2f}" + (f" (n={int(row.seeds)})" if row.seeds > 1 else "")

    summary = summary.assign(cell=summary.apply(cell, axis=1))  # a new frame: the caller's stays as it was
    keys = ["model", "method"]
    if headroom is not None and len(headroom):  # one more row per model: what any method can still gain
        summary = pd.concat([summary, headroom.assign(method="(headroom: dense - best heuristic)",
                                                      cell=headroom["headroom"].map(lambda v: f"{v:.2f}"))])
    top1 = summary.pivot(index=keys, columns="target_sparsity", values="cell").fillna("")
    secs = summary.pivot(index=keys, columns="target_sparsity", values="prune_seconds")
    secs = secs.apply(lambda col: col.map(lambda v: "" if pd.isna(v) else f"{v:.4g}"))
    top1.columns = [f"{c:g}" for c in top1.columns]
    secs.columns = [f"s {c:g}" for c in secs.columns]
    both = top1.join(secs).reset_index()
    return ("Top-1 % per target sparsity (mean over seeds; n = seeds when more than one), then the mean "
            "pruning wall seconds per job (`s`: the algorithm's own time, without dense training and "
            "evaluation). The headroom row of each model: dense top-1 minus the best magnitude heuristic "
            "(+BN) in that cell, what any method can still gain there.\n\n"
            + both.to_markdown(index=False, disable_numparse=True))


def select_methods(table: pd.DataFrame, patterns: Sequence[str] | None) -> pd.DataFrame:
    """The rows whose method label matches one of the shell-style `patterns` (all rows if none given).

    A job that failed before its method was built has no label and matches no pattern; a record that could
    not be read stays, since it might have been of any method."""
    if not patterns or table.empty:
        return table

    def matches(method: object) -> bool:
        return isinstance(method, str) and any(fnmatch.fnmatchcase(method, p) for p in patterns)

    keep = table["method"].map(matches) | (table["status"] == UNREADABLE)
    return table[keep].reset_index(drop=True)


def plot_accuracy_vs_sparsity(table: pd.DataFrame, path: Path) -> None:
    """One panel per model, one line per method (mean over seeds, band = one std), dense as a reference;
    a method keeps its colour and marker across panels, and one legend below the panels names them."""
    summary = seed_summary(table)
    models = sorted(table["model"].dropna().unique()) or ["(none)"]
    styles = method_styles(summary["method"].astype(str)) if not summary.empty else {}
    fig = Figure(figsize=(5.2 * len(models), 4.2))
    axes = fig.subplots(1, len(models), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        part = summary[summary["model"] == model] if not summary.empty else summary
        for method, rows in part.groupby("method") if not part.empty else []:
            rows = rows.sort_values("target_sparsity")
            x, y = rows["target_sparsity"].astype(float), rows["top1_mean"].astype(float)
            (line,) = ax.plot(x, y, label=method, markersize=5, **styles[str(method)])
            std = rows["top1_std"].fillna(0).astype(float)
            if (rows["seeds"] > 1).any():
                ax.fill_between(x, y - std, y + std, color=line.get_color(), alpha=0.2)
        dense = pd.to_numeric(table.loc[table["model"] == model, "dense_top1"], errors="coerce").dropna()
        if not dense.empty:
            ax.axhline(dense.mean(), color="black", linestyle="--", linewidth=1)
            ax.annotate(f"dense {dense.mean():.1f}", (0.01, dense.mean()), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, 3), fontsize=8)
        failed = table[(table["model"] == model) & (table["status"] != "ok")]
        title = f"{model}" + (f"  ({len(failed)} failed)" if len(failed) else "")
        ax.set(title=title, xlabel="target sparsity", ylabel="top-1 (%)")
        ax.grid(alpha=0.3)
    if styles:
        handles = [Line2D([], [], label=m, **st) for m, st in styles.items()]
        ncol = legend_columns([h.get_label() for h in handles], fig.get_figwidth(), fontsize=8)
        fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        rows = -(-len(handles) // ncol)
        fig.tight_layout(rect=(0, min(0.45, 0.07 * rows + 0.02), 1, 1))
    else:
        fig.tight_layout()
    save_figure(fig, path)


def write_report(dirs: Iterable[str | Path], out_dir: str | Path, methods: Sequence[str] | None = None
                 ) -> pd.DataFrame:
    """Gather result.json files under `dirs` (only the methods matching `methods`, shell-style patterns,
    if given) and write results.csv, results.md, accuracy_vs_sparsity.png."""
    dirs = [Path(d) for d in dirs]
    out = Path(out_dir)
    table = select_methods(results_table(load_records(dirs)), methods)
    write_csv(out / "results.csv", table)
    n_failed = int((table["status"] != "ok").sum()) if len(table) else 0
    n_missed = int((table["status"] == "target_missed").sum()) if len(table) else 0
    header = (f"# Results\n\n{len(table)} jobs from {', '.join(map(str, dirs))}; "
              f"{n_failed - n_missed} failed.\n\n")
    n_unreadable = int((table["status"] == UNREADABLE).sum()) if len(table) else 0
    if n_unreadable:
        header += (f"**{n_unreadable} records could not be read** (status `{UNREADABLE}`, file and line in "
                   f"the status column): they are left out of every summary.\n\n")
    if n_missed:  # measured, but at another sparsity than asked: kept out of the by-sparsity summary
        header += (f"**{n_missed} jobs missed their sparsity target** (status `target_missed`, reason in the "
                   f"status column): their rows are listed below but left out of the summaries.\n\n")
    if methods:
        header += f"Methods matching: {', '.join(f'`{m}`' for m in methods)}.\n\n"
    probe = probe_rows(table)
    if probe.any():
        images = pd.to_numeric(table.loc[probe, "eval_images"], errors="coerce").dropna()
        sizes = sorted({int(n) for n in images})
        header += (
            f"**Small probe set:** {int(probe.sum())} jobs were evaluated on only "
            f"{', '.join(map(str, sizes))} images, so their top-1 moves in coarse steps; read it with the "
            f"top-1 agreement with the dense model and the mean KL(dense‖sparse) of the predictions.\n\n"
        )
    summary = seed_summary(table)
    body = markdown_table(table) if len(table) else "(no result files found)"
    if not summary.empty:
        body = ("## By sparsity\n\n" + by_sparsity(summary, headroom_rows(summary, table))
                + "\n\n## Every job\n\n" + body)
    if not summary.empty and (summary["seeds"] > 1).any():
        body += "\n\n## Mean over seeds\n\n" + summary.to_markdown(index=False, floatfmt=".4g")
    write_atomic(out / "results.md", header + body + "\n")
    plot_accuracy_vs_sparsity(table, out / "accuracy_vs_sparsity.png")
    return table


@program("ptsbench-report")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptsbench-report", description=__doc__)
    parser.add_argument("dirs", nargs="*", metavar="DIR",
                        help="sweep or job directories holding result.json files")
    parser.add_argument("--out", help="where to write the tables and plot (default: the first DIR)")
    parser.add_argument("--reference", nargs="?", const=str(REFERENCE_CSV), metavar="CSV",
                        help="also write reference_comparison.{md,csv}: measured rows beside the published "
                             "numbers in CSV (default: "
                             f"{REFERENCE_CSV.relative_to(REFERENCE_CSV.parents[2])})")
    parser.add_argument("--methods", nargs="+", metavar="PATTERN",
                        help="only methods whose label matches one of these shell-style patterns "
                             "(e.g. 'unipts*' 'magnitude-erk+bn')")
    parser.add_argument("--any-dataset", action="store_true",
                        help="with --reference, match published rows on other datasets too (shown in a "
                             "column)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # `--reference DIR ...`: DIR is a result dir
    if args.reference is not None and Path(args.reference).is_dir():
        args.dirs.insert(0, args.reference)
        args.reference = str(REFERENCE_CSV)
    if not args.dirs:
        parser.error("give at least one DIR holding result.json files")
    if args.any_dataset and args.reference is None:
        parser.error("--any-dataset only applies with --reference")
    missing = [d for d in args.dirs if not Path(d).exists()]
    if missing:
        raise DataError(f"no such directory: {', '.join(missing)}")
    out = Path(args.out or args.dirs[0])
    table = write_report(args.dirs, out, args.methods)
    if table.empty:
        what = f"matching {args.methods} " if args.methods else ""
        print(f"ptsbench-report: no result.json files {what}under {', '.join(args.dirs)}", file=sys.stderr)
        return 1
    unreadable = table.loc[table["status"] == UNREADABLE, "error"].tolist()
    for problem in unreadable:
        print(f"ptsbench-report: left out: {problem}", file=sys.stderr)
    log.info("%d jobs (%d failed) -> %s/results.{csv,md}, accuracy_vs_sparsity.png",
             len(table), int((table["status"] != "ok").sum()), out)

    command = shlex.join(["ptsbench-report", *args.dirs, *(["--out", args.out] if args.out else []),
                          *(["--methods", *args.methods] if args.methods else [])])
    points = write_pareto(table, out, command)
    if len(points):
        log.info("%d method points -> %s/pareto.{csv,md,png}", len(points), out)
    if args.reference is not None:
        comparison = write_reference_comparison(table, out, args.reference, any_dataset=args.any_dataset,
                                                sources=", ".join(args.dirs))
        log.info("%d measured rows, %d with a published counterpart -> %s/reference_comparison.{csv,md}",
                 len(comparison), int(comparison["published_method"].notna().sum()), out)
    if unreadable:  # the tables are written, but they are not the whole of what was asked for
        print(f"ptsbench-report: {len(unreadable)} records could not be read and are left out of the tables "
              f"(status {UNREADABLE} in results.md).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
