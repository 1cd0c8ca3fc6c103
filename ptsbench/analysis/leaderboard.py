"""The leaderboard: every method ranked on each model's discriminating sparsities, seeds paired.

    python -m ptsbench.analysis.leaderboard [--studies results/leaderboard ...] [--out results/leaderboard]

For each model and sparsity of the records (a cell), one row per method run (label): mean top-1 over seeds,
its standard deviation and seed count, the share of dense top-1 it keeps, pruning seconds and passes, and
the gap to the cell's leader paired by seed with its 95% interval (the leader's lead is real where the
interval stays above zero). Each cell states its headroom (dense minus the best heuristic, the heuristics
of conf/study/claims.yaml). A summary opens the page: at each model's highest discriminating sparsity, the
best run and the share of dense it keeps. Written to OUT/leaderboard.md and OUT/leaderboard.csv.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ptsbench.analysis import program
from ptsbench.analysis.claims import (
    cell_runs,
    discriminating_sparsities,
    headroom,
    load_settings,
    markdown,
    paired_gain,
    strongest,
)
from ptsbench.analysis.study import study_records
from ptsbench.errors import PtsbenchError
from ptsbench.results import write_atomic, write_csv


def _families(records: pd.DataFrame) -> list[str]:
    return sorted(records["method_family"].fillna(records["method"]).unique())


def cell_table(records: pd.DataFrame, model: str, sparsity: float, heuristics: Sequence[str]) -> pd.DataFrame:
    """One row per run in the cell, best mean first, with the paired gap to the leader."""
    runs = cell_runs(records, model, _families(records), sparsity)
    if not runs:
        return pd.DataFrame()
    leader = strongest(runs)
    cell = records[(records["model"] == model) & ((records["target_sparsity"] - sparsity).abs() < 1e-9)]
    dense = float(cell["dense_top1"].iloc[0])
    room = headroom(records, model, sparsity, heuristics)
    rows = []
    for run in sorted(runs, key=lambda r: (-r.mean, r.seconds)):
        gap = paired_gain(run, leader) if run is not leader else None
        rows.append({"model": model, "sparsity": sparsity, "dense": dense, "headroom": room,
                     "method": run.label,
                     "top-1": run.mean, "std": float(run.top1.std()) if run.seeds > 1 else math.nan,
                     "seeds": run.seeds, "% of dense": 100.0 * run.mean / dense, "seconds": run.seconds,
                     "passes": run.passes, "gap to leader [95% CI]": gap.describe() if gap else "leader"})
    return pd.DataFrame(rows)


def leaderboard(records: pd.DataFrame) -> pd.DataFrame:
    heuristics = load_settings().heuristics
    ok = records[records["status"] == "ok"]
    tables = [cell_table(ok, model, float(s), heuristics)
              for (model, s), _ in ok.groupby(["model", "target_sparsity"])]
    tables = [t for t in tables if len(t)]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def summary(board: pd.DataFrame) -> pd.DataFrame:
    """At each model's highest discriminating sparsity: the best run (at least 3 seeds where any has them)."""
    rows = []
    for model, g in board.groupby("model"):
        highest = max(discriminating_sparsities().get(model, ()), default=g["sparsity"].max())
        cell = g[(g["sparsity"] - highest).abs() < 1e-9]
        if cell.empty:
            continue
        seeded = cell[cell["seeds"] >= 3]
        best = (seeded if len(seeded) else cell).iloc[0]
        rows.append({"model": model, "highest discriminating sparsity": f"{highest:g}",
                     "dense": best["dense"],
                     "headroom": best["headroom"], "best run": best["method"], "top-1": best["top-1"],
                     "seeds": best["seeds"], "% of dense": best["% of dense"],
                     "runs in the cell": len(cell)})
    return pd.DataFrame(rows)


def write_leaderboard(studies: Sequence[Path], out: Path) -> str:
    tables = [study_records(s) for s in studies]
    records = (pd.concat([t for t in tables if len(t)], ignore_index=True)
               if any(len(t) for t in tables) else None)
    if records is None:
        raise PtsbenchError(f"no records in {', '.join(map(str, studies))}")
    board = leaderboard(records)
    parts = ["# Leaderboard", "",
             "Rebuilt by `python -m ptsbench.analysis.leaderboard` from "
             f"{', '.join(f'`{s}`' for s in studies)}. "
             "Per model and sparsity, every method run (label) by mean top-1 over its seeds; `gap to "
             "leader`: paired by seed, with its 95% Student-t interval (one seed: no interval). `headroom`: "
             "dense top-1 minus the best heuristic of the cell.", "",
             "## At each model's highest discriminating sparsity", "",
             markdown(summary(board)), ""]
    for (model, sparsity), cell in board.groupby(["model", "sparsity"], sort=True):
        parts += [f"## {model} at {sparsity:g} (dense {cell['dense'].iloc[0]:.2f}, headroom "
                  f"{cell['headroom'].iloc[0]:.2f})", "",
                  markdown(cell.drop(columns=["model", "sparsity", "dense", "headroom"])), ""]
    text = "\n".join(parts)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "leaderboard.md", text)
    write_csv(out / "leaderboard.csv", board)
    return text


@program("python -m ptsbench.analysis.leaderboard")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptsbench.analysis.leaderboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", nargs="+", default=["results/leaderboard"], help="study folders")
    parser.add_argument("--out", default="results/leaderboard", help="where leaderboard.md/.csv go")
    args = parser.parse_args(argv)
    write_leaderboard([Path(s) for s in args.studies], Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
