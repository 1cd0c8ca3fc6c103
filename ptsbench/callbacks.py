"""Hydra callbacks: at the end of a multirun, gather every job's result into tables and a plot."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ptsbench.analysis.report import write_report
from ptsbench.errors import FolderTaken, PtsbenchError
from ptsbench.paths import check_output_dir
from ptsbench.tracking import sweep_group

log = logging.getLogger(__name__)


def refuse(error: PtsbenchError) -> None:
    """Stop before Hydra creates or writes anything, with one paragraph (a callback's exception would be
    turned into a warning by Hydra, and an error from its own folder creation into a traceback)."""
    print(f"ptsbench: {error}", file=sys.stderr)
    raise SystemExit(1)


class JobFolders(Callback):
    """Checks the output folder before Hydra makes it: it can be created and written (not a file, not a name
    too long, not a full disk), and a single run's `hydra.run.dir` is claimed by the job's config hash, so a
    second, different job pointed at it is refused before it writes anything there."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ptsbench.cli import job_identity
        from ptsbench.results import claim_folder
        from ptsbench.runner import folder_taken

        try:
            run_dir, identity = str(config.hydra.run.dir), job_identity(config)
        except Exception:  # a config that does not resolve: the job reports it in its own words
            return
        try:
            folder = check_output_dir(run_dir, "hydra.run.dir")
            owner = claim_folder(folder, identity)
        except PtsbenchError as exc:
            refuse(exc)
        if owner is not None:
            refuse(FolderTaken(folder_taken(folder, owner, identity, "hydra.run.dir")))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep_dir = str(config.hydra.sweep.dir)
        except Exception:
            return
        try:
            check_output_dir(sweep_dir, "hydra.sweep.dir")
        except PtsbenchError as exc:
            refuse(exc)


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
