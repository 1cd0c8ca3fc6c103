"""Each model's discriminating sparsities, computed from the records: where the strongest heuristic has lost
between `min_loss` and `max_loss` points of dense top-1 (conf/study/leaderboard.yaml `discriminating`).

    python -m ptsbench.analysis.discriminating [--results results] [--write]

Below that range every method, the simplest included, keeps the dense accuracy, so no ranking can show;
above it the heuristics sit at chance. The heuristics are probed on a grid of sparsities by the
leaderboard's first curve (seed 0); the range is read from the leaderboard and default-benchmark records.
`--write` puts the result into each model config's `discriminating_sparsities`, which the leaderboard and
the default benchmark's learned methods run at.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ptsbench.analysis import program
from ptsbench.analysis.claims import cell_runs, pooled_records, strongest
from ptsbench.analysis.study import check_names, method_family, study_config
from ptsbench.config import CONF_DIR
from ptsbench.errors import ConfigError
from ptsbench.results import write_atomic

STUDIES = ("leaderboard", "fmnist_benchmark")
KEY = "discriminating_sparsities"


def model_configs() -> dict[str, Path]:
    """timm name -> the model config that lists sweep_sparsities (the embedded zoo's models)."""
    from omegaconf import OmegaConf

    found = {}
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        if cfg.get("sweep_sparsities"):
            found.setdefault(str(cfg.name), path)
    return found


def losses(records: pd.DataFrame, heuristics: Sequence[str]) -> pd.DataFrame:
    """Per model and sparsity: dense top-1, the best heuristic (mean over seeds) and its loss."""
    rows = []
    ok = records[records["status"] == "ok"]
    for (model, sparsity), cell in ok.groupby(["model", "target_sparsity"]):
        best = strongest(cell_runs(cell, model, heuristics, sparsity))
        if best is not None:
            dense = float(cell["dense_top1"].iloc[0])
            rows.append({"model": model, "sparsity": float(sparsity), "dense": dense,
                         "best heuristic": best.label,
                         "top-1": best.mean, "loss": dense - best.mean})
    return pd.DataFrame(rows)


def discriminating(table: pd.DataFrame, min_loss: float, max_loss: float) -> dict[str, list[float]]:
    inside = table[(table["loss"] >= min_loss) & (table["loss"] <= max_loss)]
    return {m: sorted(round(s, 6) for s in g["sparsity"]) for m, g in inside.groupby("model")}


def write_model_config(path: Path, sparsities: Sequence[float]) -> None:
    """Replace (or add after sweep_sparsities) the model config's discriminating_sparsities line."""
    text = path.read_text()
    line = (f"{KEY}: [{', '.join(f'{s:g}' for s in sparsities)}]"
            "  # python -m ptsbench.analysis.discriminating --write")
    if re.search(rf"^{KEY}:.*$", text, flags=re.M):
        text = re.sub(rf"^{KEY}:.*$", line, text, flags=re.M)
    else:
        text = re.sub(r"^(sweep_sparsities:.*)$", rf"\1\n{line}", text, count=1, flags=re.M)
    write_atomic(path, text)


@program("python -m ptsbench.analysis.discriminating")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptsbench.analysis.discriminating", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results", help="the results root (default: results)")
    parser.add_argument("--write", action="store_true", help="write the ranges into the model configs")
    args = parser.parse_args(argv)
    cfg = study_config("leaderboard").get("discriminating")
    if cfg is None:
        raise ConfigError("conf/study/leaderboard.yaml lacks the key 'discriminating'.")
    heuristics = [method_family(h) for h in check_names("discriminating.heuristics", cfg.heuristics)]
    records = pooled_records(Path(args.results), STUDIES)
    if records.empty:
        raise ConfigError(f"no records in {', '.join(f'{args.results}/{s}' for s in STUDIES)}.")
    table = losses(records, heuristics).sort_values(["model", "sparsity"])
    ranges = discriminating(table, float(cfg.min_loss), float(cfg.max_loss))
    print(table.to_markdown(index=False, floatfmt=".2f"))
    configs = model_configs()
    for model, sparsities in ranges.items():
        print(f"{model}: {KEY} {sparsities}")
        if args.write and model in configs:
            write_model_config(configs[model], sparsities)
    return 0


if __name__ == "__main__":
    sys.exit(main())
