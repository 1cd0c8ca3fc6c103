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

    Exits non-zero (after writing everything) when any job failed or missed its sparsity target
    (status target_missed: its numbers are measured at another sparsity than asked), so scripts notice.
    """

    def __init__(self, fail_on_error: bool = True):
        self.fail_on_error = fail_on_error

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = write_report([sweep_dir], sweep_dir)
        if config.get("logger") and len(table):
            tracker = hydra.utils.instantiate(config.logger)
            tracker.sweep_summary(table, sweep_group(config.hydra.sweep.dir), str(sweep_dir))
        not_ok = table[table["status"] != "ok"] if len(table) else table
        missed = int((not_ok["status"] == "target_missed").sum()) if len(not_ok) else 0
        log.info("Sweep finished: %d jobs, %d failed, %d missed their sparsity target. Tables and plot in %s",
                 len(table), len(not_ok) - missed, missed, sweep_dir)
        for _, row in not_ok.iterrows():
            log.error("%s: %s %s %s: %s", row["status"], row["model"], row["method"], row["target_sparsity"],
                      row["error"])
        if self.fail_on_error and len(not_ok):
            raise SystemExit(1)
