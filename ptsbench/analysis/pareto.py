"""Accuracy against pruning cost: which methods are worth what they spend, per (model, sparsity, pattern).

`ptsbench-report DIR` writes, beside results.md, `pareto.csv` (one row per method point), `pareto.md`
(one table per cell) and `pareto.png` (one panel per cell, top-1 against pruning seconds). A method
point is one method label in one cell: its ok jobs averaged over seeds. The Pareto front of a cell is
computed twice, once against the pruning wall seconds and once against the images the harness counted
through the model (forward + backward passes): seconds depend on the machine and its load, passes do not.

Records name a method's family and budget in `method_family` (the label without its budget tags) and
`budget_fraction` (the budget as a fraction of the method's reference budget); older records have
neither, and then each label is its own family with no budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no backend, no global figure state
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from ptsbench.analysis.plotting import legend_columns, method_styles
from ptsbench.results import save_figure, write_atomic, write_csv

CELL = ["model", "target_sparsity", "pattern"]
POINT = [*CELL, "method_family", "method"]
COLUMNS = [*POINT, "budget", "budget_fraction", "seeds", "prune_seconds", "passes", "top1", "dense_top1",
           "front_seconds", "front_passes"]
MD_COLUMNS = {"method_family": "family", "method": "method", "budget_fraction": "budget (x ref.)",
              "seeds": "seeds", "prune_seconds": "prune s", "passes": "passes (images)", "top1": "top-1",
              "front_seconds": "front (s)", "front_passes": "front (passes)"}
ON_FRONT, OFF_FRONT, UNKNOWN = "✓", "", "–"


def pareto_front(cost: Sequence[float], top1: Sequence[float]) -> pd.Series:
    """True for the points no other point dominates (costs no more and scores no less, one of them
    strictly), so equal points are all on the front; NA where the cost or top-1 is unknown: such a point
    neither joins nor blocks the front."""
    c, g = np.asarray(cost, dtype=float), np.asarray(top1, dtype=float)
    known = ~(np.isnan(c) | np.isnan(g))
    # dominated[i, j]: point j dominates point i
    dominated = (c[None, :] <= c[:, None]) & (g[None, :] >= g[:, None]) & (
        (c[None, :] < c[:, None]) | (g[None, :] > g[:, None]))
    on = ~(dominated & known[None, :]).any(axis=1)
    return pd.Series(pd.array(np.where(known, on, None), dtype="boolean"))


def _numeric(df: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(np.nan, index=df.index)


def _budget(df: pd.DataFrame) -> pd.Series:
    """The budget tag (algorithm_options.budget: 'quick', 'reference', ...), flattened or not."""
    if "algorithm_options.budget" in df:
        return df["algorithm_options.budget"]
    if "algorithm_options" in df:
        return df["algorithm_options"].map(lambda o: o.get("budget") if isinstance(o, dict) else None)
    return pd.Series(None, index=df.index, dtype=object)


def method_points(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, sparsity, pattern, method) of the ok jobs, mean over seeds, with both fronts;
    rows sorted by cell, then seconds."""
    ok = table[table["status"] == "ok"] if "status" in table else table.iloc[:0]
    if ok.empty:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.DataFrame({
        "model": ok["model"], "target_sparsity": _numeric(ok, "target_sparsity"),
        "pattern": ok["pattern"].fillna("unstructured") if "pattern" in ok else "unstructured",
        "method": ok["method"].astype(str),
        "method_family": ok["method_family"].fillna(ok["method"]) if "method_family" in ok else ok["method"],
        "budget": _budget(ok), "budget_fraction": _numeric(ok, "budget_fraction"),
        "seed": ok.get("seed", 0),
        "prune_seconds": _numeric(ok, "prune_seconds"), "top1": _numeric(ok, "top1"),
        "dense_top1": _numeric(ok, "dense_top1"),
        "passes": _numeric(ok, "forward_passes") + _numeric(ok, "backward_passes"),
    })
    points = df.groupby(POINT, dropna=False, sort=False).agg(
        budget=("budget", "first"), budget_fraction=("budget_fraction", "mean"), seeds=("seed", "nunique"),
        prune_seconds=("prune_seconds", "mean"), passes=("passes", "mean"), top1=("top1", "mean"),
        dense_top1=("dense_top1", "mean"),
    ).reset_index()
    points = points.sort_values([*CELL, "prune_seconds", "top1", "method"],
                                ascending=[True] * 4 + [False, True],
                                na_position="last", kind="stable").reset_index(drop=True)
    for name, cost in (("front_seconds", "prune_seconds"), ("front_passes", "passes")):
        points[name] = pd.Series(pd.NA, index=points.index, dtype="boolean")
        for _, rows in points.groupby(CELL, dropna=False, sort=False):
            points.loc[rows.index, name] = pareto_front(rows[cost], rows["top1"]).to_numpy()
    return points[COLUMNS]


def cell_title(model: str, sparsity: float, pattern: str) -> str:
    return f"{model}, sparsity {sparsity:g}" + ("" if pattern == "unstructured" else f", {pattern}")


def _mark(on) -> str:
    return UNKNOWN if pd.isna(on) else ON_FRONT if on else OFF_FRONT


def _fmt(value, fmt: str) -> str:
    return "—" if pd.isna(value) else format(value, fmt)


def pareto_markdown(points: pd.DataFrame, command: str) -> str:
    lines = [
        "# Accuracy against pruning cost",
        "",
        "Per model, target sparsity and pattern, every method's point (ok jobs only, mean over seeds): "
        "pruning wall seconds, images through the model (forward + backward passes, counted by the harness) "
        f"and top-1 %. `{ON_FRONT}` marks the Pareto front: no other point of the section costs no more and "
        "scores no less, one of the two strictly; computed once against seconds and once against passes "
        f"(`{UNKNOWN}`: "
        "cost not recorded). `budget (x ref.)` is the budget as a fraction of the method's reference budget. "
        "Rows sorted by seconds. pareto.png plots the sections with at least two points.",
        "",
        f"Rebuild: `{command}` (also writes pareto.csv and pareto.png).",
    ]
    for (model, sparsity, pattern), rows in points.groupby(CELL, dropna=False, sort=False):
        shown = pd.DataFrame({
            "method_family": rows["method_family"], "method": rows["method"],
            "budget_fraction": rows["budget_fraction"].map(lambda v: _fmt(v, ".3g")),
            "seeds": rows["seeds"].map(str),
            "prune_seconds": rows["prune_seconds"].map(lambda v: _fmt(v, ".3g")),
            "passes": rows["passes"].map(lambda v: _fmt(v, ",.0f")),
            "top1": rows["top1"].map(lambda v: _fmt(v, ".2f")),
            "front_seconds": rows["front_seconds"].map(_mark),
                              "front_passes": rows["front_passes"].map(_mark),
        }).rename(columns=MD_COLUMNS)
        dense = rows["dense_top1"].mean()
        lines += ["", f"## {cell_title(model, sparsity, pattern)}", "",
                  f"Dense top-1 {_fmt(dense, '.2f')} %.", "",
                  shown.to_markdown(index=False, disable_numparse=True)]
    return "\n".join(lines) + "\n"


def plot_pareto(points: pd.DataFrame, path: Path) -> None:
    """One panel per cell with at least two points (every cell if none has two): top-1 against pruning
    seconds on a log axis, a family's points joined in budget order, front points ringed in black and the
    front drawn as a staircase, dense top-1 dashed; one legend of families below the panels."""
    groups = dict(list(points.groupby(CELL, dropna=False, sort=False)))
    cells = [c for c, rows in groups.items() if len(rows) >= 2] or list(groups)
    styles = method_styles(points["method_family"].astype(str))
    ncols = min(3, len(cells))
    nrows = -(-len(cells) // ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(cells):]:
        ax.set_visible(False)
    for ax, cell in zip(axes.flat, cells, strict=False):
        rows = groups[cell]
        for family, fam in rows.groupby("method_family", sort=False):
            fam = fam.sort_values(["budget_fraction", "prune_seconds"], na_position="last")
            style = styles[str(family)]
            ax.plot(fam["prune_seconds"], fam["top1"], color=style["color"], linewidth=1, alpha=0.7, zorder=2)
            for on, part in fam.groupby(fam["front_seconds"].fillna(False).astype(bool)):
                ax.plot(part["prune_seconds"], part["top1"], linestyle="none", marker=style["marker"],
                        color=style["color"], markersize=7 if on else 5, zorder=3,
                        markeredgecolor="black" if on else style["color"], markeredgewidth=1.4 if on else 0.5)
            for _, p in fam[fam["budget_fraction"].notna()].iterrows():
                ax.annotate(f"{p.budget_fraction:g}", (p.prune_seconds, p.top1), textcoords="offset points",
                            xytext=(4, -9), fontsize=6, color=style["color"])
        front = rows[rows["front_seconds"].fillna(False).astype(bool)].sort_values("prune_seconds")
        ax.step(front["prune_seconds"], front["top1"], where="post", color="black", linewidth=0.8, alpha=0.5,
                zorder=1)
        dense = rows["dense_top1"].mean()
        if pd.notna(dense):
            ax.axhline(dense, color="black", linestyle="--", linewidth=1)
            ax.annotate(f"dense {dense:.1f}", (0.99, dense), xycoords=("axes fraction", "data"), ha="right",
                        textcoords="offset points", xytext=(0, 3), fontsize=7)
        ax.set_xscale("log")  # whole decades: every panel gets labelled major ticks, however close its points
        seconds = rows["prune_seconds"][rows["prune_seconds"] > 0]
        if len(seconds):
            ax.set_xlim(10 ** np.floor(np.log10(seconds.min() / 1.3)),
                        10 ** np.ceil(np.log10(seconds.max() * 1.3)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(cell_title(*cell), fontsize=9)
        ax.set_xlabel("pruning seconds (log)", fontsize=8)
        ax.set_ylabel("top-1 (%)", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], label=f, linewidth=1, **st) for f, st in styles.items()]
    handles.append(Line2D([], [], label="Pareto front (s)", color="black", linewidth=0.8, marker="o",
                          markerfacecolor="white", markeredgecolor="black", markeredgewidth=1.4))
    ncol = legend_columns([h.get_label() for h in handles], fig.get_figwidth(), fontsize=8)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    legend_in = 0.25 * -(-len(handles) // ncol) + 0.2
    fig.tight_layout(rect=(0, min(0.45, legend_in / fig.get_figheight()), 1, 1))
    save_figure(fig, path)


def write_pareto(table: pd.DataFrame, out_dir: str | Path, command: str) -> pd.DataFrame:
    """pareto.csv, pareto.md and pareto.png in `out_dir` from a results table (report.results_table);
    `command` is the line that rebuilds them. Returns the method points (empty, and nothing written,
    when no job is ok)."""
    out = Path(out_dir)
    points = method_points(table)
    if points.empty:
        return points
    write_csv(out / "pareto.csv", points)
    write_atomic(out / "pareto.md", pareto_markdown(points, command))
    plot_pareto(points, out / "pareto.png")
    return points
