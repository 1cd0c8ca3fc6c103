"""The papers' headline claims, tested on the committed studies.

    python -m ptsbench.analysis.claims [--results results] [--out results/claims/claims.md]

Reads the studies that conf/study/claims.yaml lists (records.jsonl of each, whatever has been run) and
results/technique_matrix, and writes a table per claim. A cell is a model and a sparsity; in a cell every
budget of the claimed method that ran gets a row, compared with

* the strongest baseline run **at equal or lower cost** (mean pruning seconds and passes, each within
  `cost_slack` of the claimed run's): the comparison that decides the verdict;
* beside it, the strongest baseline run at any budget, and its gain.

Gains are paired by seed (the same seed, hence the same calibration draw, on both sides) and carry a
Student-t interval at `confidence`. The verdict (`verdict`):

* **not testable**: the cell's headroom (dense top-1 minus the best heuristic) is under `min_headroom` or
  under the paper's effect: no method can show the claimed gain there;
* **holds**: the interval's lower bound is above 0 and the mean gain reaches the paper's size;
* **holds in direction only**: the lower bound is above 0;
* **does not hold**: the upper bound is at or below `tie`;
* **inconclusive**: otherwise (one seed has no interval: inconclusive);
* **no baseline at this cost**: no baseline run costs as little as the claimed run.

A side with fewer than `min_seeds` seeds marks the verdict *provisional*. The rule's thresholds, the
methods each claim compares, the paper's numbers and the cells are in conf/study/claims.yaml; method labels
come from the algorithm classes.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf
from scipy import stats

from ptsbench.analysis import program
from ptsbench.analysis.matrix import (
    MATRIX_RECONSTRUCTIONS,
    MatrixSettings,
    cell_allocation,
    cell_reconstruction,
)
from ptsbench.analysis.matrix import load_settings as matrix_settings
from ptsbench.analysis.study import check_names, method_family, study_config, study_records
from ptsbench.config import CONF_DIR
from ptsbench.errors import ConfigError, DataError
from ptsbench.results import RECORDS_FILE, write_atomic

STUDY = "claims"
DISCRIMINATING = "discriminating"  # in a claim's sparsities: each model's discriminating_sparsities


@dataclass(frozen=True)
class VerdictRule:
    confidence: float = 0.95
    tie: float = 0.5
    min_headroom: float = 1.0
    min_seeds: int = 3
    cost_slack: float = 1.1


@dataclass(frozen=True)
class Claim:
    name: str  # the table's title word: FCPTS, UniPTS
    method: str  # method families, from the algorithm configs conf/study/claims.yaml names
    baselines: tuple[str, ...]
    sparsities: tuple[float | str, ...]  # numbers, or DISCRIMINATING
    paper_gain: float
    plain_kd: str | None = None  # UniPTS: its plain-KD variant, shown beside it


@dataclass(frozen=True)
class ClaimSettings:
    rule: VerdictRule
    heuristics: tuple[str, ...]  # families whose best mean sets a cell's headroom
    fcpts: Claim
    unipts: Claim
    studies: tuple[str, ...] = ("pts_methods",)
    second_dense: str | None = None  # a study of the claims' runs on another dense generation

    @property
    def tie(self) -> float:
        return self.rule.tie


def _sparsities(values: Sequence) -> tuple[float | str, ...]:
    out: list[float | str] = []
    for v in values:
        if isinstance(v, str) and v == DISCRIMINATING:
            out.append(v)
        else:
            out.append(float(v))
    return tuple(out)


def load_settings() -> ClaimSettings:
    """conf/study/claims.yaml with every algorithm config checked and turned into its method label."""
    cfg = study_config(STUDY)
    where = f"conf/study/{STUDY}.yaml"
    try:
        f, u = cfg.fcpts, cfg.unipts
        names = [f.method, *f.baselines, u.method, u.against, u.plain_kd, *cfg.heuristics]
        label = {name: method_family(name) for name in check_names(where, names)}
        rule = VerdictRule(**OmegaConf.to_container(cfg.get("verdict", {})))
        return ClaimSettings(
            rule, tuple(label[h] for h in cfg.heuristics),
            Claim("FCPTS", label[f.method], tuple(label[b] for b in f.baselines), _sparsities(f.sparsities),
                  float(f.paper_gain)),
            Claim("UniPTS", label[u.method], (label[u.against],), _sparsities(u.sparsities),
                  float(u.paper_gain),
                  label[u.plain_kd]),
            tuple(str(s) for s in cfg.get("studies", ["pts_methods"])),
            str(cfg.second_dense) if cfg.get("second_dense") else None)
    except (AttributeError, TypeError) as exc:  # a missing key of the loaded file, or an unknown verdict key
        raise ConfigError(f"{where}: {exc}") from None


@cache
def discriminating_sparsities() -> dict[str, tuple[float, ...]]:
    """timm model name -> the discriminating_sparsities of the model config that lists them."""
    found: dict[str, tuple[float, ...]] = {}
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        if cfg.get("discriminating_sparsities"):
            found.setdefault(str(cfg.name), tuple(float(s) for s in cfg.discriminating_sparsities))
    return found


def claim_cells(records: pd.DataFrame, claim: Claim) -> list[tuple[str, float]]:
    """(model, sparsity) for every model of the records and every sparsity the claim names."""
    cells = []
    for model in sorted(records["model"].unique()):
        wanted: list[float] = []
        for s in claim.sparsities:
            wanted += list(discriminating_sparsities().get(model, ())) if s == DISCRIMINATING else [float(s)]
        cells += [(model, s) for s in sorted(set(wanted))]
    return cells


# --------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    """One method label in one cell: its top-1 per seed (the most recent record of a seed) and its cost."""

    label: str
    family: str
    top1: pd.Series  # indexed by seed
    seconds: float  # mean pruning seconds
    passes: float  # mean images through the model, forward + backward
    budget: float  # budget_fraction (NaN: the method has none)

    @property
    def mean(self) -> float:
        return float(self.top1.mean())

    @property
    def seeds(self) -> int:
        return int(len(self.top1))

    def describe(self) -> str:
        return f"{self.label} {self.mean:.2f} ({self.seeds} seeds, {self.seconds:.0f} s)"

    def costs_no_more_than(self, other: Run, slack: float) -> bool:
        def within(mine: float, theirs: float) -> bool:
            return math.isnan(mine) or math.isnan(theirs) or mine <= theirs * slack

        return within(self.seconds, other.seconds) and within(self.passes, other.passes)


def _families(records: pd.DataFrame) -> pd.Series:
    if "method_family" in records:
        return records["method_family"].fillna(records["method"])
    return records["method"]


def cell_rows(records: pd.DataFrame, model: str, family: str, sparsity: float) -> pd.DataFrame:
    """The ok records of one method family in one cell."""
    return records[(records["model"] == model) & (_families(records) == family)
                   & ((records["target_sparsity"] - sparsity).abs() < 1e-9) & (records["status"] == "ok")]


def _mean(rows: pd.DataFrame, *columns: str) -> float:
    if not all(c in rows for c in columns):
        return float("nan")
    return float(sum(pd.to_numeric(rows[c], errors="coerce").fillna(0.0) for c in columns).mean())


def cell_runs(records: pd.DataFrame, model: str, families: Sequence[str], sparsity: float) -> list[Run]:
    """Every run (label) of the given families in the cell."""
    runs = []
    for family in families:
        rows = cell_rows(records, model, family, sparsity)
        if "finished_at" in rows:
            rows = rows.sort_values("finished_at")
        for label, g in rows.groupby("method", sort=True):
            budget = pd.to_numeric(g["budget_fraction"],
                                   errors="coerce").max() if "budget_fraction" in g else math.nan
            runs.append(Run(str(label), family, g.groupby("seed")["top1"].last(), _mean(g, "prune_seconds"),
                            _mean(g, "forward_passes", "backward_passes"), float(budget)))
    return runs


def strongest(runs: Sequence[Run]) -> Run | None:
    """The highest mean top-1 (more seeds, then lower cost, among equals)."""
    return max(runs, key=lambda r: (r.mean, r.seeds, -r.seconds)) if runs else None


def headroom(records: pd.DataFrame, model: str, sparsity: float, heuristics: Sequence[str]) -> float:
    """Dense top-1 minus the best heuristic's mean top-1 in the cell (NaN when none ran)."""
    best = strongest(cell_runs(records, model, heuristics, sparsity))
    rows = records[(records["model"] == model) & ((records["target_sparsity"] - sparsity).abs() < 1e-9)]
    if best is None or rows.empty:
        return float("nan")
    return float(rows["dense_top1"].iloc[0]) - best.mean


def markdown(table: pd.DataFrame) -> str:
    """Numbers with two decimals, except sparsities as typed (0.995 must not read 0.99)."""
    shown = table.copy()
    for column in shown.columns:
        if column in ("sparsity", "target_sparsity"):
            shown[column] = shown[column].map(lambda v: f"{v:g}")
        elif pd.api.types.is_float_dtype(shown[column]):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    return shown.to_markdown(index=False, disable_numparse=True)


# ------------------------------------------------------------------------------------------ verdicts


@dataclass(frozen=True)
class Gain:
    mean: float
    low: float
    high: float
    seeds: int  # paired seeds

    def describe(self) -> str:
        if math.isnan(self.mean):
            return ""
        if self.seeds < 2:
            return f"{self.mean:+.2f} (1 seed)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired_gain(a: Run, b: Run, confidence: float = 0.95) -> Gain:
    """Mean of (a - b) over the seeds both ran, with its Student-t interval (none with one seed)."""
    diff = (a.top1 - b.top1).dropna()
    n = len(diff)
    if n == 0:
        return Gain(math.nan, math.nan, math.nan, 0)
    mean = float(diff.mean())
    if n < 2:
        return Gain(mean, -math.inf, math.inf, 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(diff.std()) / math.sqrt(n)
    return Gain(mean, mean - half, mean + half, n)


def verdict(gain: Gain, headroom: float, paper_gain: float, rule: VerdictRule = VerdictRule(),
            seeds: tuple[int, int] = (0, 0)) -> str:
    """The verdict on one comparison (the module docstring's rule); `seeds`: each side's seed count."""
    if math.isnan(gain.mean):
        return "no baseline at this cost"
    if math.isnan(headroom) or headroom < max(rule.min_headroom, paper_gain):
        return "not testable"
    if gain.low > 0:
        text = "holds" if gain.mean >= paper_gain else "holds in direction only"
    elif gain.high <= rule.tie:
        text = "does not hold"
    else:
        text = "inconclusive"
    return text + (" (provisional)" if min(seeds) < rule.min_seeds else "")


def claim_table(records: pd.DataFrame, claim: Claim, settings: ClaimSettings) -> pd.DataFrame:
    """One row per (cell, run of the claimed method): the claimed run against the strongest baseline at equal
    or lower cost (the verdict) and against the strongest at any budget."""
    rule = settings.rule
    rows = []
    for model, sparsity in claim_cells(records, claim):
        room = headroom(records, model, sparsity, settings.heuristics)
        baselines = cell_runs(records, model, claim.baselines, sparsity)
        for run in cell_runs(records, model, [claim.method], sparsity):
            matched = strongest([b for b in baselines if b.costs_no_more_than(run, rule.cost_slack)])
            best = strongest(baselines)
            gain = (paired_gain(run, matched, rule.confidence) if matched
                    else Gain(math.nan, math.nan, math.nan, 0))
            any_gain = paired_gain(run, best, rule.confidence) if best else gain
            dense = cell_rows(records, model, claim.method, sparsity)["dense_top1"].iloc[0]
            row = {"model": model, "sparsity": sparsity, "dense": dense, "headroom": room,
                   f"{claim.name} run": run.label, "top-1": run.mean, "seeds": run.seeds,
                   "seconds": run.seconds,
                   "baseline at <= cost": matched.describe() if matched else "none ran at this cost",
                   "gain [95% CI]": gain.describe(), "paired seeds": gain.seeds,
                   "verdict": verdict(gain, room, claim.paper_gain, rule,
                                      (run.seeds, matched.seeds if matched else 0)),
                   "strongest baseline, any budget": best.describe() if best else "",
                   "gain over it": any_gain.describe()}
            if claim.plain_kd:
                kd = strongest(cell_runs(records, model, [claim.plain_kd], sparsity))
                row[f"{claim.name} with plain KD"] = kd.describe() if kd else ""
            rows.append(row)
    return pd.DataFrame(rows)


def fcpts_claim(records: pd.DataFrame, settings: ClaimSettings) -> pd.DataFrame:
    """FCPTS: '>30 points over post-training baselines at 80%' (ResNet-50/ImageNet)."""
    return claim_table(records, settings.fcpts, settings)


def unipts_claim(records: pd.DataFrame, settings: ClaimSettings) -> pd.DataFrame:
    """UniPTS: 68.6% against POT's 3.9% at 90% (ResNet-50/ImageNet), a 64.7-point lead."""
    return claim_table(records, settings.unipts, settings)


RUN_KEYS = ["model", "method", "target_sparsity", "seed"]


def same_runs(records: pd.DataFrame, like: pd.DataFrame) -> pd.DataFrame:
    """The records of `records` that ran what a record of `like` ran (model, label, sparsity, seed)."""
    def keys(frame: pd.DataFrame) -> pd.Series:
        rounded = frame[RUN_KEYS].assign(target_sparsity=frame["target_sparsity"].round(6))
        return rounded.astype(str).agg("|".join, axis=1)

    return records[keys(records).isin(set(keys(like)))]


def second_dense_claims(records: pd.DataFrame, other: pd.DataFrame, claims: ClaimSettings) -> pd.DataFrame:
    """Each claim's rows on another dense generation (`other`: the same methods, budgets and seeds run on a
    dense model trained with another seed) beside the same runs on the shipped dense model."""
    shipped = same_runs(records, other)
    rows = []
    for claim in (claims.fcpts, claims.unipts):
        a, b = claim_table(shipped, claim, claims), claim_table(other, claim, claims)
        if a.empty or b.empty:
            continue
        on = ["model", "sparsity", f"{claim.name} run"]
        both = a.merge(b, on=on, suffixes=(" (shipped)", " (second)"))
        for _, row in both.iterrows():
            rows.append({"claim": f"{claim.name} - "
                                  f"{' / '.join(claim.baselines) if claim.plain_kd else 'baselines'}",
                         "model": row["model"], "sparsity": row["sparsity"], "run": row[f"{claim.name} run"],
                         "dense shipped / second": f"{row['dense (shipped)']:.2f} / "
                                                   f"{row['dense (second)']:.2f}",
                         **{f"{key} ({side})": row[f"{key} ({side})"] for side in ("shipped", "second")
                            for key in ("headroom", "baseline at <= cost", "gain [95% CI]", "verdict")}})
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
               *(f"{recon} - {base} ({over})" for recon in repairs
                 for over in ("best alloc", "mean over allocs")),
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
    rule = claims.rule
    records = pooled_records(results, claims.studies)
    matrix = study_records(results / "technique_matrix")
    parts = [
        "# The papers' headline claims on the embedded benchmark",
        "",
        f"Rebuilt by `python -m ptsbench.analysis.claims` from the studies "
        f"{', '.join(f'`{results}/{s}`' for s in claims.studies)} and `{results}/technique_matrix` (what "
        "each claim compares and the rule's thresholds: conf/study/claims.yaml). Fashion-MNIST models "
        "trained by the harness. One row per budget of the claimed method that ran in a cell (`run`: its "
        f"label, mean top-1, seeds and pruning seconds). `headroom`: dense top-1 minus the best heuristic "
        f"({', '.join(claims.heuristics)}) in the cell. Each row's verdict compares the run with the "
        f"strongest baseline that cost no more (seconds and passes within {rule.cost_slack:g}x of the "
        f"run's); the gain is paired by seed with its {rule.confidence:.0%} Student-t interval. *not "
        f"testable*: headroom under {rule.min_headroom:g} point or under the paper's effect; *holds*: the "
        "interval above 0 and the mean at least the paper's effect; *holds in direction only*: the interval "
        f"above 0; *does not hold*: the interval at or below {rule.tie:g}; *inconclusive*: otherwise (one "
        f"seed has no interval); *(provisional)*: a side with fewer than {rule.min_seeds} seeds. The "
        f"strongest baseline at any budget, and the run's gain over it, stand beside.",
        "",
    ]
    for claim, title in ((claims.fcpts,
                          f"## FCPTS: a large gain over post-training baselines at 80% (paper: > "
                                        f"{claims.fcpts.paper_gain:g} points, ResNet-50/ImageNet)"),
                         (claims.unipts, "## UniPTS: 68.6% against POT's 3.9% at 90% (ResNet-50/ImageNet)")):
        table = claim_table(records, claim, claims) if not records.empty else pd.DataFrame()
        parts += [title, "", f"Baselines: {', '.join(claim.baselines)}.", ""]
        parts += [markdown(table) if len(table) else f"(no {claim.method} rows)", ""]
    parts += ["## PTSBench: learned allocation and block-wise reconstruction help most", "",
              "Top-1 differences in points from the technique matrix (magnitude masks + BN re-estimation; "
              "see technique_matrix/technique_matrix.md). Learned allocations: "
              f"{', '.join(matrix_roles.learned)}; heuristic: {', '.join(matrix_roles.heuristic)}.", ""]
    m = matrix_claim(matrix, matrix_roles)
    parts += [markdown(m) if len(m) else "(technique matrix not run)", ""]
    other = study_records(results / claims.second_dense) if claims.second_dense else pd.DataFrame()
    d = second_dense_claims(records, other, claims) if len(other) and len(records) else pd.DataFrame()
    if len(d):
        parts += ["## With a second dense model", "",
                  "The claims on a dense model trained with another seed "
                  f"(`{results}/{claims.second_dense}`), beside the same runs (method, budget, sparsity, "
                  "seeds) on the shipped dense model: how far a verdict moves with the dense model it "
                  "starts from.", "",
                  markdown(d), ""]
    text = "\n".join(parts)
    write_atomic(out, text)
    return text


@program("python -m ptsbench.analysis.claims")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptsbench.analysis.claims", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results", help="the results root (default: results)")
    parser.add_argument("--out", default=None, help="default: RESULTS/claims/claims.md")
    args = parser.parse_args(argv)
    results = Path(args.results)
    studies = load_settings().studies
    if not any((results / s / RECORDS_FILE).is_file() for s in studies):
        raise DataError(f"none of {', '.join(str(results / s / RECORDS_FILE) for s in studies)} exists; run "
                        "scripts/results.sh first.")
    write_claims(results, Path(args.out) if args.out else results / STUDY / "claims.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
