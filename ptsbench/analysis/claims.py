"""The papers' headline claims, tested on the committed studies.

    python -m ptsbench.analysis.claims [--results results] [--out results/claims/claims.md]

Reads the studies that conf/study/claims.yaml lists (records.jsonl of each, whatever has been run) and
results/technique_matrix, and writes a table per claim with the measured numbers and a plain verdict:

* **holds**: the effect is there and at least as large as the paper's;
* **holds in direction only**: the method wins, by less than the paper reports;
* **does not hold here**: no gain (within `tie` points) or a loss.

Each cell is the mean over the seeds that were run (calibration draw and algorithm randomness; the
dense model is shared), and a gain is taken seed by seed, so its standard deviation is the seed band. A
gain whose band reaches zero (mean - std <= tie) does not count as a gain. The column `seeds` says how
many seeds went in; with one seed a verdict is provisional. A method is matched by its family (the label
without budget tags), and each cell takes the highest budget measured for it (`budget_fraction`): a claim
is decided by the most compute any study spent on it, and the table names that run. Which algorithms each claim compares, the
paper's numbers and `tie` are in conf/study/claims.yaml (learned and heuristic allocations:
conf/study/technique_matrix.yaml); method labels come from the algorithm classes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ptsbench.analysis.matrix import (
    MATRIX_RECONSTRUCTIONS,
    MatrixSettings,
    cell_allocation,
    cell_reconstruction,
)
from ptsbench.analysis.matrix import load_settings as matrix_settings
from ptsbench.analysis.study import check_names, method_family, study_config, study_records
from ptsbench.errors import ConfigError, PtsbenchError
from ptsbench.results import RECORDS_FILE, write_atomic

STUDY = "claims"


@dataclass(frozen=True)
class FcptsClaim:
    method: str  # method families, from the algorithm configs conf/study/claims.yaml names
    baselines: tuple[str, ...]
    sparsities: tuple[float, ...]
    paper_gain: float


@dataclass(frozen=True)
class UniptsClaim:
    method: str
    against: str
    plain_kd: str
    sparsity: float
    paper_gain: float


@dataclass(frozen=True)
class ClaimSettings:
    tie: float
    fcpts: FcptsClaim
    unipts: UniptsClaim
    studies: tuple[str, ...] = ("pts_methods",)  # pooled: each cell uses the highest budget any of them ran
    second_dense: str | None = None  # a study of the claims' runs on another dense generation


def load_settings() -> ClaimSettings:
    """conf/study/claims.yaml with every algorithm config checked and turned into its method label."""
    cfg = study_config(STUDY)
    where = f"conf/study/{STUDY}.yaml"
    try:
        f, u = cfg.fcpts, cfg.unipts
        label = {name: method_family(name) for name in check_names(where, [
            f.method, *f.baselines, u.method, u.against, u.plain_kd])}
        return ClaimSettings(
            float(cfg.tie),
            FcptsClaim(label[f.method], tuple(label[b] for b in f.baselines), tuple(float(s) for s in f.sparsities),
                       float(f.paper_gain)),
            UniptsClaim(label[u.method], label[u.against], label[u.plain_kd], float(u.sparsity), float(u.paper_gain)),
            tuple(str(s) for s in cfg.get("studies", ["pts_methods"])),
            str(cfg.second_dense) if cfg.get("second_dense") else None)
    except AttributeError as exc:  # OmegaConf's missing-key error on a plain loaded file
        raise ConfigError(f"{where}: {exc}") from None


def verdict(gain: float, paper_gain: float, spread: float = 0.0, tie: float = 0.5) -> str:
    """`gain` is the mean over seeds, `spread` its standard deviation over seeds (0 with one seed)."""
    if pd.isna(gain):
        return "not measured"
    if gain - (0.0 if pd.isna(spread) else spread) <= tie:
        return "does not hold here"
    return "holds" if gain >= paper_gain else "holds in direction only"


def cell_rows(records: pd.DataFrame, model: str, family: str, sparsity: float) -> pd.DataFrame:
    """The ok records of one method family in one cell (older records without a family: their label)."""
    families = records["method_family"].fillna(records["method"]) if "method_family" in records else records["method"]
    return records[(records["model"] == model) & (families == family)
                   & ((records["target_sparsity"] - sparsity).abs() < 1e-9) & (records["status"] == "ok")]


def budgets(rows: pd.DataFrame) -> pd.Series:
    """Each record's budget_fraction as a number (NaN where a record has none)."""
    if "budget_fraction" not in rows:
        return pd.Series(float("nan"), index=rows.index)
    return pd.to_numeric(rows["budget_fraction"], errors="coerce")


def highest_budget(records: pd.DataFrame, model: str, family: str, sparsity: float) -> str | None:
    """The label of the family's run with the largest budget_fraction in the cell (None: not run)."""
    rows = cell_rows(records, model, family, sparsity)
    if rows.empty:
        return None
    budget = budgets(rows)
    if budget.isna().all():
        return str(rows["method"].iloc[-1])
    return str(rows.loc[budget.fillna(-1.0).idxmax(), "method"])


def most_seeded(records: pd.DataFrame, model: str, family: str, sparsity: float) -> str | None:
    """The label of the family's run with the most seeds in the cell, the higher budget among equals."""
    rows = cell_rows(records, model, family, sparsity)
    if rows.empty:
        return None
    runs = rows.assign(_budget=budgets(rows).fillna(-1.0)).groupby("method").agg(seeds=("seed", "nunique"), budget=("_budget", "max"))
    return str(runs.sort_values(["seeds", "budget"]).index[-1])


def seed_top1(records: pd.DataFrame, model: str, family: str, sparsity: float, label: str | None = None) -> pd.Series:
    """Top-1 per seed of one cell at the family's highest budget, or of its run `label` (the most recent
    record where a seed was run twice)."""
    label = label or highest_budget(records, model, family, sparsity)
    rows = cell_rows(records, model, family, sparsity)
    rows = rows[rows["method"] == label]
    if "finished_at" in rows:
        rows = rows.sort_values("finished_at")
    return rows.groupby("seed")["top1"].last()


def mean_top1(records: pd.DataFrame, model: str, method: str, sparsity: float) -> tuple[float, int]:
    top1 = seed_top1(records, model, method, sparsity)
    return (float(top1.mean()) if len(top1) else float("nan")), int(len(top1))


def seed_gain(records: pd.DataFrame, model: str, method: str, other: str, sparsity: float,
              most_seeds: bool = False) -> tuple[float, float, int]:
    """Mean and standard deviation over seeds of (method - other), paired by seed; each side at its
    highest budget, or (`most_seeds`) at its run with the most seeds."""
    def top1(family: str) -> pd.Series:
        label = most_seeded(records, model, family, sparsity) if most_seeds else None
        return seed_top1(records, model, family, sparsity, label)

    diff = (top1(method) - top1(other)).dropna()
    if diff.empty:
        return float("nan"), float("nan"), 0
    return float(diff.mean()), (float(diff.std()) if len(diff) > 1 else 0.0), int(len(diff))


def band(mean: float, std: float, n: int) -> str:
    return "" if pd.isna(mean) else (f"{mean:+.2f}" if n < 2 else f"{mean:+.2f} ± {std:.2f}")


def seeded_band(records: pd.DataFrame, model: str, method: str, other: str, sparsity: float) -> str:
    """The gain at the runs with the most seeds, when that is not the highest budget's single seed: how
    far the seed band reaches where the decisive run could not be repeated."""
    label = most_seeded(records, model, method, sparsity)
    if label == highest_budget(records, model, method, sparsity):
        return ""  # the table's own gain and band are already those runs'
    gain, std, n = seed_gain(records, model, method, other, sparsity, most_seeds=True)
    if pd.isna(gain) or n < 2:
        return ""
    return f"{label}: {band(gain, std, n)} ({n} seeds)"


def fcpts_claim(records: pd.DataFrame, claim: FcptsClaim, tie: float = 0.5) -> pd.DataFrame:
    """FCPTS: '>30 points over post-training baselines at 80%' (ResNet-50/ImageNet). Measured as FCPTS
    minus the best and the worst post-training baseline at each of the claim's sparsities."""
    rows = []
    for model in sorted(records["model"].unique()):
        for sparsity in claim.sparsities:
            f, n = mean_top1(records, model, claim.method, sparsity)
            base = {b: mean_top1(records, model, b, sparsity)[0] for b in claim.baselines}
            base = {k: v for k, v in base.items() if not pd.isna(v)}
            if pd.isna(f) or not base:
                continue
            run = highest_budget(records, model, claim.method, sparsity)
            best = max(base, key=base.get)
            worst = min(base, key=base.get)
            g_best = seed_gain(records, model, claim.method, best, sparsity)
            g_worst = seed_gain(records, model, claim.method, worst, sparsity)
            rows.append({"model": model, "sparsity": sparsity, "FCPTS run (highest budget)": run,
                         "FCPTS top-1": f, "seeds": n,
                         "best baseline": f"{highest_budget(records, model, best, sparsity)} {base[best]:.2f}", "gain over best": g_best[0],
                         "± (seeds)": band(*g_best),
                         "gain over best, most seeds": seeded_band(records, model, claim.method, best, sparsity),
                         "worst baseline": f"{highest_budget(records, model, worst, sparsity)} {base[worst]:.2f}", "gain over worst": g_worst[0],
                         "verdict (vs best)": verdict(g_best[0], claim.paper_gain, g_best[1], tie)})
    return pd.DataFrame(rows)


def unipts_claim(records: pd.DataFrame, claim: UniptsClaim, tie: float = 0.5) -> pd.DataFrame:
    """UniPTS: 68.6% against POT's 3.9% at 90% (ResNet-50/ImageNet), a 64.7-point lead."""
    rows = []
    for model in sorted(records["model"].unique()):
        u, n = mean_top1(records, model, claim.method, claim.sparsity)
        p, _ = mean_top1(records, model, claim.against, claim.sparsity)
        if pd.isna(u) or pd.isna(p):
            continue
        kl, _ = mean_top1(records, model, claim.plain_kd, claim.sparsity)
        gain, spread, paired = seed_gain(records, model, claim.method, claim.against, claim.sparsity)
        rows.append({"model": model, "UniPTS run (highest budget)": highest_budget(records, model, claim.method,
                                                                                     claim.sparsity),
                     "UniPTS top-1": u, "POT run": highest_budget(records, model, claim.against, claim.sparsity),
                     "POT top-1": p, "seeds": min(n, paired),
                     "UniPTS - POT": gain, "± (seeds)": band(gain, spread, paired),
                     "UniPTS - POT, most seeds": seeded_band(records, model, claim.method, claim.against,
                                                             claim.sparsity),
                     "UniPTS with plain KD (kl)": kl, "POT collapses (< 20%)": p < 20.0,
                     "verdict": verdict(gain, claim.paper_gain, spread, tie)})
    return pd.DataFrame(rows)


RUN_KEYS = ["model", "method", "target_sparsity", "seed"]


def same_runs(records: pd.DataFrame, like: pd.DataFrame) -> pd.DataFrame:
    """The records of `records` that ran what a record of `like` ran (model, label, sparsity, seed)."""
    def keys(frame: pd.DataFrame) -> pd.Series:
        return frame[RUN_KEYS].assign(target_sparsity=frame["target_sparsity"].round(6)).astype(str).agg("|".join, axis=1)

    return records[keys(records).isin(set(keys(like)))]


def second_dense_claims(records: pd.DataFrame, other: pd.DataFrame, claims: ClaimSettings) -> pd.DataFrame:
    """Each claim's gain on another dense generation (`other`: the same methods, budgets and seeds run on a
    dense model trained with another seed) beside the same runs on the shipped dense model."""
    shipped = same_runs(records, other)
    rows = []
    for claim, measure, gain, best in (
            ("FCPTS - best baseline", lambda r: fcpts_claim(r, claims.fcpts, claims.tie), "gain over best",
             "best baseline"),
            ("UniPTS - POT", lambda r: unipts_claim(r, claims.unipts, claims.tie), "UniPTS - POT", "POT run")):
        a, b = measure(shipped), measure(other)
        if a.empty or b.empty:
            continue
        on = [k for k in ("model", "sparsity") if k in a]
        both = a.merge(b, on=on, suffixes=(" (shipped)", " (second)"))
        verdict = "verdict (vs best)" if "verdict (vs best)" in a else "verdict"
        for _, row in both.iterrows():
            cell = shipped[(shipped["model"] == row["model"])]
            second = other[(other["model"] == row["model"])]
            rows.append({"claim": claim, "model": row["model"],
                         "sparsity": row.get("sparsity", claims.unipts.sparsity),
                         "seeds": row["seeds (second)"],
                         "dense top-1 shipped / second": f"{cell['dense_top1'].iloc[0]:.2f} / {second['dense_top1'].iloc[0]:.2f}",
                         "against (shipped)": row[f"{best} (shipped)"], "gain (shipped)": row[f"{gain} (shipped)"],
                         "± (shipped)": row["± (seeds) (shipped)"], "verdict (shipped)": row[f"{verdict} (shipped)"],
                         "against (second)": row[f"{best} (second)"], "gain (second)": row[f"{gain} (second)"],
                         "± (second)": row["± (seeds) (second)"], "verdict (second)": row[f"{verdict} (second)"]})
    return pd.DataFrame(rows)


def matrix_claim(matrix: pd.DataFrame, settings: MatrixSettings) -> pd.DataFrame:
    """PTSBench: learned allocation and block-wise reconstruction help most. For each model and sparsity
    of the matrix: the gain of the best learned allocation over the best heuristic one (no
    reconstruction), and of block-wise over no and over layer-wise reconstruction (best allocation)."""
    if matrix.empty:
        return pd.DataFrame()
    ok = matrix[matrix["status"] == "ok"].copy()
    ok["allocation"] = cell_allocation(ok)
    ok["reconstruction"] = cell_reconstruction(ok)
    base, *repairs = MATRIX_RECONSTRUCTIONS  # "none", then the modes that repair (SparseGPT's update last)
    rows = []
    learned_gain = "learned - heuristic alloc (no recon)"
    columns = ["model", "sparsity", "cells", learned_gain,
               *(f"{recon} - {base} ({over})" for recon in repairs for over in ("best alloc", "mean over allocs")),
               "block - layer (mean over allocs)", "largest effect"]
    for (model, sparsity), g in ok.groupby(["model", "target_sparsity"]):
        t = g.pivot_table(index="allocation", columns="reconstruction", values="top1")
        row = {"model": model, "sparsity": sparsity, "cells": int(t.notna().sum().sum())}
        if base in t:  # a difference is taken only over the allocations that have both of its columns
            none = t[base].dropna()
            learned = [a for a in settings.learned if a in none.index]
            heuristic = [a for a in settings.heuristic if a in none.index]
            if learned and heuristic:
                row[learned_gain] = none[learned].max() - none[heuristic].max()
            for recon in repairs:
                if recon in t and len(pair := t[[recon, base]].dropna()):
                    row[f"{recon} - {base} (best alloc)"] = pair[recon].max() - pair[base].max()
                    row[f"{recon} - {base} (mean over allocs)"] = (pair[recon] - pair[base]).mean()
        if "block" in t and "layer" in t and len(pair := t[["block", "layer"]].dropna()):
            row["block - layer (mean over allocs)"] = (pair["block"] - pair["layer"]).mean()
        gains = {k: v for k, v in row.items() if k.endswith("(mean over allocs)") or k.startswith("learned")}
        row["largest effect"] = max(gains, key=gains.get) if gains else ""
        rows.append(row)
    return pd.DataFrame(rows).reindex(columns=columns)


def pooled_records(results: Path, studies: Sequence[str]) -> pd.DataFrame:
    """The records of every listed study that has been collected, in one table."""
    tables = [study_records(results / s) for s in studies if (results / s / RECORDS_FILE).is_file()]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def write_claims(results: Path, out: Path) -> str:
    """claims.md from the studies claims.yaml lists and results/technique_matrix."""
    claims, matrix_roles = load_settings(), matrix_settings()
    records = pooled_records(results, claims.studies)
    matrix = study_records(results / "technique_matrix")
    seeds = sorted(records["seed"].unique().tolist()) if not records.empty else []
    parts = [
        "# The papers' headline claims on the embedded benchmark",
        "",
        f"Rebuilt by `python -m ptsbench.analysis.claims` from the studies "
        f"{', '.join(f'`{results}/{s}`' for s in claims.studies)} and `{results}/technique_matrix` (what each "
        f"claim compares: conf/study/claims.yaml). Fashion-MNIST models trained by the harness; each cell takes "
        f"the highest budget any study ran for the method (its run is named in the table), seeds present: "
        f"{seeds}. Verdicts: "
        f"*holds* (effect at least the paper's size), *holds in direction only*, *does not hold here* (mean gain "
        f"minus its seed standard deviation <= {claims.tie:g} points). Gains are taken seed by seed; `±` is their "
        f"standard deviation over the `seeds` column's count (empty with one seed: that verdict is provisional). "
        f"Where the highest budget ran fewer seeds than another budget of the same cell, the `most seeds` column "
        f"gives the gain and its band at the runs with the most seeds (each side's own), so a one-seed verdict "
        f"can be read against the seed noise of the same cell.",
        "",
        f"## FCPTS: a large gain over post-training baselines at 80% (paper: > {claims.fcpts.paper_gain:g} points, "
        f"ResNet-50/ImageNet)",
        "",
    ]
    f = fcpts_claim(records, claims.fcpts, claims.tie) if not records.empty else pd.DataFrame()
    parts += [f.to_markdown(index=False, floatfmt=".2f") if len(f) else f"(no {claims.fcpts.method} rows)", ""]
    parts += ["## UniPTS: 68.6% against POT's 3.9% at 90% (ResNet-50/ImageNet)", ""]
    u = unipts_claim(records, claims.unipts, claims.tie) if not records.empty else pd.DataFrame()
    parts += [u.to_markdown(index=False, floatfmt=".2f") if len(u)
              else f"(no {claims.unipts.method} and {claims.unipts.against} rows at {claims.unipts.sparsity:g})", ""]
    parts += ["## PTSBench: learned allocation and block-wise reconstruction help most", "",
              "Top-1 differences in points from the technique matrix (magnitude masks + BN re-estimation; see "
              "technique_matrix/technique_matrix.md). Learned allocations: "
              f"{', '.join(matrix_roles.learned)}; heuristic: {', '.join(matrix_roles.heuristic)}.", ""]
    m = matrix_claim(matrix, matrix_roles)
    parts += [m.to_markdown(index=False, floatfmt=".2f") if len(m) else "(technique matrix not run)", ""]
    other = study_records(results / claims.second_dense) if claims.second_dense else pd.DataFrame()
    d = second_dense_claims(records, other, claims) if len(other) and len(records) else pd.DataFrame()
    if len(d):
        parts += ["## With a second dense model", "",
                  f"The FCPTS and UniPTS claims on a dense model trained with another seed "
                  f"(`{results}/{claims.second_dense}`), beside the same runs (method, budget, sparsity, seeds) on "
                  f"the shipped dense model: how far a verdict moves with the dense model it starts from.", "",
                  d.to_markdown(index=False, floatfmt=".2f"), ""]
    text = "\n".join(parts)
    write_atomic(out, text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptsbench.analysis.claims", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results", help="the results root (default: results)")
    parser.add_argument("--out", default=None, help="default: RESULTS/claims/claims.md")
    args = parser.parse_args(argv)
    results = Path(args.results)
    try:
        studies = load_settings().studies
        if not any((results / s / RECORDS_FILE).is_file() for s in studies):
            print(f"ptsbench.analysis.claims: none of {', '.join(str(results / s / RECORDS_FILE) for s in studies)} "
                  "exists; run scripts/results.sh first.", file=sys.stderr)
            return 2
        write_claims(results, Path(args.out) if args.out else results / STUDY / "claims.md")
    except PtsbenchError as exc:
        print(f"ptsbench.analysis.claims: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
