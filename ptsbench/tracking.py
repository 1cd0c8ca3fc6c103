"""Experiment trackers. Local result files are the truth; a tracker mirrors them (W&B), or does nothing."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)


def sweep_group(sweep_dir: str) -> str:
    """The W&B group of a sweep: its output directory, flattened."""
    return str(sweep_dir).strip("/").replace("/", "_")


class Tracker:
    """The no-op tracker (logger=none): every method is safe to call."""

    def start(self, *, name: str, group: str, job_type: str, config: dict[str, Any], tags: list[str],
              dir: str) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_table(self, key: str, table: pd.DataFrame) -> None:
        pass

    def finish(self, summary: dict[str, Any], failed: bool = False) -> None:
        pass

    def sweep_summary(self, table: pd.DataFrame, group: str, dir: str) -> None:
        """At the end of a sweep: one run with the results table and accuracy-vs-sparsity plots."""


class WandbTracker(Tracker):
    """One W&B run per job: group = the sweep, job type = the algorithm, config = the resolved config."""

    def __init__(self, project: str = "ptsbench", entity: str | None = None, mode: str | None = None,
                 tags: list[str] | None = None):
        self.project, self.entity, self.mode = project, entity, mode
        self.extra_tags = list(tags or [])
        self.run = None

    def start(self, *, name: str, group: str, job_type: str, config: dict[str, Any], tags: list[str],
              dir: str) -> None:
        import wandb

        self.run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, name=name,
                              group=group,
                              job_type=job_type, config=config, tags=tags + self.extra_tags, dir=dir,
                              reinit="finish_previous")

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, key: str, table: pd.DataFrame) -> None:
        if self.run is None:
            return
        import wandb

        wb_table = wandb.Table(dataframe=table)
        logged = {key: wb_table}
        if key == "allocation" and {"name", "achieved_sparsity"} <= set(table.columns):
            logged[f"{key}_chart"] = wandb.plot.bar(wb_table, "name", "achieved_sparsity",
                                                    title="per-layer sparsity")
        self.run.log(logged)

    def finish(self, summary: dict[str, Any], failed: bool = False) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update({k: v for k, v in summary.items() if v is not None})
        finally:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None

    def sweep_summary(self, table: pd.DataFrame, group: str, dir: str) -> None:
        import wandb

        run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, name=f"{group}-summary",
                         group=group, job_type="summary", tags=["summary", *self.extra_tags], dir=dir,
                         reinit="finish_previous")
        try:
            run.log({"results": wandb.Table(dataframe=table.astype({c: str for c in table.columns
                                                                     if table[c].dtype == object}))})
            ok = table[table["status"] == "ok"]
            for model, rows in ok.groupby("model"):
                methods = sorted(rows["method"].unique())
                xs, ys = [], []
                for method in methods:
                    part = (rows[rows["method"] == method].groupby("target_sparsity")["top1"].mean()
                            .sort_index())
                    xs.append(part.index.tolist())
                    ys.append(part.tolist())
                run.log({f"accuracy_vs_sparsity/{model}": wandb.plot.line_series(
                    xs=xs, ys=ys, keys=methods, title=f"{model}: top-1 vs sparsity",
                    xname="target sparsity")})
            run.summary.update({"jobs": len(table), "failed": int((table["status"] != "ok").sum())})
        finally:
            run.finish()
