"""Studies of points: every method with a compute knob, run at several budgets on the same cells.

`conf/study/budget_curves.yaml` (the budget curves) and `conf/study/leaderboard.yaml` (every method on each
model's discriminating sparsities, seeds paired) list the models, the sparsities and the curves (algorithm
configs, the key that sets the budget and its values; a curve without a key runs the presets as they are).
A curve's `sparsities` are numbers or `discriminating` / `highest`: the model config's
`discriminating_sparsities`, or the highest of them. Each point is a job in
RUNS/<model>/<algorithm>/<budget|n|preset><value>/<sparsity>/seed<s>/;
a job whose identical config already finished there is skipped, so an interrupted run continues. The study
is then collected into OUT and `ptsbench-report OUT` writes the tables, the accuracy plot and the
cost-normalised view (pareto.md, pareto.png), where each method's budget points are joined.

    python -m ptsbench.analysis.budget --out results/budget_curves [--models vit_tiny] [--algorithms fcpts]
        [--add] [-- threads=1]
    python -m ptsbench.analysis.budget --study leaderboard --out results/leaderboard [--seeds 0] ...

With `--add` the jobs the study folder already holds (the committed ones, on a fresh clone) stay and their
configs are not rerun; only the missing points run and are added.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ptsbench.analysis import program
from ptsbench.analysis.report import main as report_main
from ptsbench.analysis.study import check_names, collect, study_config
from ptsbench.config import CONF_DIR
from ptsbench.errors import ConfigError
from ptsbench.results import RECORDS_FILE

log = logging.getLogger(__name__)

STUDY = "budget_curves"
KEYS = ("algorithm.budget", "calib.n", "algorithm.owl.lam")  # the knobs a curve may turn
PRESET = "preset"  # the key of a curve that turns no knob
SPARSITY_WORDS = ("discriminating", "highest")


@dataclass(frozen=True)
class Point:
    model: str
    algorithm: str
    key: str
    value: float | int
    sparsity: float
    seed: int

    @property
    def overrides(self) -> list[str]:
        knob = [] if self.key == PRESET else [f"{self.key}={self.value}"]
        return [f"model={self.model}", f"algorithm={self.algorithm}", *knob]

    def job_dir(self, runs: Path) -> Path:
        return (runs / self.model / self.algorithm / f"{self.key.rpartition('.')[2]}{self.value}"
                / str(self.sparsity) / f"seed{self.seed}")


def model_sparsities(model: str, spec: object, where: str) -> list[float]:
    """A curve's sparsities for one model: a list of numbers, or a word naming the model config's
    `discriminating_sparsities` (all of them, or the highest)."""
    if not isinstance(spec, str):
        return [float(s) for s in spec]
    if spec not in SPARSITY_WORDS:
        raise ConfigError(f"{where}: sparsities {spec!r} is neither a list nor one of "
                          f"{', '.join(SPARSITY_WORDS)}.")
    found = OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml").get("discriminating_sparsities")
    if not found:
        raise ConfigError(f"{where}: model={model} lists no discriminating_sparsities "
                          "(python -m ptsbench.analysis.discriminating --write).")
    values = sorted(float(s) for s in found)
    return values if spec == "discriminating" else values[-1:]


def study_points(models: Sequence[str] | None = None, algorithms: Sequence[str] | None = None,
                 study: str = STUDY, seeds: Sequence[int] | None = None) -> list[Point]:
    """Every point of every curve of the study config, for its models (or `models`), its algorithms (or
    those of `algorithms`) and its seeds (or those of `seeds`). A curve may name its own `sparsities` and
    `seeds` (the reference budget repeated on the claims' cells) and its own `models` (a subset of the
    study's: a longer budget only where the curve is still climbing); a point listed twice runs once."""
    cfg = study_config(study)
    where = f"conf/study/{study}.yaml"
    points: list[Point] = []
    for curve in cfg.curves:
        key = str(curve.get("key", PRESET))
        if key not in (*KEYS, PRESET):
            raise ConfigError(f"{where}: curve key {key!r} is not one of {', '.join(KEYS)} (or none, for "
                              "presets).")
        own = list(curve.get("models", cfg.models))
        if not set(own) <= set(cfg.models):
            raise ConfigError(f"{where}: curve models {own} must be among the study's models "
                              f"{list(cfg.models)}.")
        spec = curve.get("sparsities", cfg.get("sparsities", [cfg.get("sparsity")]))
        spec = spec if isinstance(spec, str) else list(spec)
        curve_seeds = [int(s) for s in curve.get("seeds", cfg.get("seeds", [0]))]
        values = list(curve["values"]) if key != PRESET else [""]
        for model in check_names("models", [m for m in models or cfg.models if m in own], group="model"):
            for algorithm in check_names("curves.algorithms", curve.algorithms):
                if algorithms and algorithm not in algorithms:
                    continue
                points += [Point(model, algorithm, key, value, sparsity, seed)
                           for sparsity in model_sparsities(model, spec, where)
                           for seed in curve_seeds if seeds is None or seed in seeds for value in values]
    return list(dict.fromkeys(points))


def run_points(points: Sequence[Point], runs: Path, extra: Sequence[str], study: str = STUDY) -> int:
    """Compose every point first (a bad override fails before any job runs), then run them; the number
    failed."""
    from ptsbench.config import compose_job_config
    from ptsbench.errors import FolderTaken
    from ptsbench.runner import JobFailed, run_job

    configs = [compose_job_config([*p.overrides, f"sparsity={p.sparsity}", f"seed={p.seed}", "resume=true",
                                   f"experiment_name={study}", *extra])
               for p in points]
    failed = 0
    for point, cfg in zip(points, configs, strict=True):
        job_dir = point.job_dir(runs)
        try:
            run_job(cfg, job_dir, sweep=study, resume_dirs=[runs])
        except (JobFailed, FolderTaken) as exc:  # a folder of another job is left as it is
            failed += 1
            log.error("%s failed: %s", job_dir, exc)
    return failed


@program("python -m ptsbench.analysis.budget")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptsbench.analysis.budget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=STUDY, help="conf/study/<STUDY>.yaml (default: %(default)s)")
    parser.add_argument("--runs", help="where the jobs run (default: runs/<STUDY>)")
    parser.add_argument("--out", required=True, help="the study folder to collect the runs into")
    parser.add_argument("--models", nargs="+", help="model configs (default: the study config's)")
    parser.add_argument("--algorithms", nargs="+", help="only the curves of these algorithm configs")
    parser.add_argument("--seeds", nargs="+", type=int, help="only these seeds (default: the curves')")
    parser.add_argument("--values", nargs="+", type=float, help="only the points whose knob has these values")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--only-highest", action="store_true",
                       help="only the points at each model's highest discriminating sparsity (run first)")
    where.add_argument("--below-highest", action="store_true",
                       help="only the points below each model's highest discriminating sparsity")
    parser.add_argument("--report-only", action="store_true", help="only collect RUNS and rebuild the tables")
    parser.add_argument("--add", action="store_true",
                        help="keep the jobs OUT already holds, skip their configs and add the new ones")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job (e.g. threads=1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs, out = Path(args.runs or f"runs/{args.study}"), Path(args.out)
    failed = 0
    # with --add, a point the committed study holds is skipped like a finished job (resume_studies)
    skip = [f"resume_studies=[{out}]"] if args.add and (out / RECORDS_FILE).is_file() else []
    if not args.report_only:
        points = study_points(args.models, args.algorithms, args.study, args.seeds)
        if args.values:
            points = [p for p in points if p.key != PRESET and float(p.value) in args.values]
        if args.only_highest or args.below_highest:
            top = {p.model: model_sparsities(p.model, "highest", args.study)[0] for p in points}
            points = [p for p in points if (p.sparsity == top[p.model]) == args.only_highest]
        failed = run_points(points, runs, [*skip, *args.overrides], args.study)
    if runs.exists() or not args.add:
        collect([runs], out, add=args.add)
    return max(report_main([str(out)]), 1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
