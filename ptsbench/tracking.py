"""Experiment trackers. Local result files are the truth; a tracker mirrors them (W&B), or does nothing."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)


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

        self.run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, name=name, group=group,
                              job_type=job_type, config=config, tags=tags + self.extra_tags, dir=dir,
                              reinit="finish_previous")

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, key: str, table: pd.DataFrame) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(dataframe=table)})

    def finish(self, summary: dict[str, Any], failed: bool = False) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update({k: v for k, v in summary.items() if v is not None})
        finally:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
