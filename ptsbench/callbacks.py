"""Hydra callbacks: at the end of a multirun, gather every job's result into tables and a plot."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ptsbench.report import write_report
from ptsbench.tracking import sweep_group

log = logging.getLogger(__name__)


class AggregateResults(Callback):
    """Writes results.csv, results.md and accuracy_vs_sparsity.png into the sweep directory.

    Exits non-zero (after writing everything) when any job failed, so scripts notice.
    """

    def __init__(self, fail_on_error: bool = True):
        self.fail_on_error = fail_on_error

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = write_report([sweep_dir], sweep_dir)
        if config.get("logger") and len(table):
            tracker = hydra.utils.instantiate(config.logger)
            tracker.sweep_summary(table, sweep_group(config.hydra.sweep.dir), str(sweep_dir))
        failed = table[table["status"] != "ok"] if len(table) else table
        log.info("Sweep finished: %d jobs, %d failed. Tables and plot in %s", len(table), len(failed), sweep_dir)
        for _, row in failed.iterrows():
            log.error("failed: %s %s %s: %s", row["model"], row["method"], row["target_sparsity"], row["error"])
        if self.fail_on_error and len(failed):
            raise SystemExit(1)
