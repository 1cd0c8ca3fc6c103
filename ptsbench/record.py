"""A job's record (its result.json), built in one place.

A record is filled stage by stage as the job runs, and written however the job ends: an ok, target_missed,
failed or interrupted record holds the keys of the stages its job reached. The keys of each stage are set
by one method of `JobRecord`; the measurements that come as a group (the audit's summary, the pruning cost,
the inference cost, the logit fidelity, the saved checkpoints) keep the keys their measuring function gives
them, and come in through `measured`. A job skipped on resume returns the earlier record (`skipped`).
"""

from __future__ import annotations

import datetime as dt
import platform
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch

import ptsbench
from ptsbench.errors import PtsbenchError
from ptsbench.jobspec import JobIdentity
from ptsbench.streams import RNG_SCHEME_VERSION

if TYPE_CHECKING:
    from algorithms.base import PTSAlgorithm
    from ptsbench.audit import Audit
    from ptsbench.dense import Dense
    from ptsbench.evaluate import EvalResult


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class JobRecord(Mapping[str, Any]):
    """One job's record; read it as a mapping, change it only through its methods."""

    def __init__(self, job: JobIdentity, commit: str | None):
        self.identity = job
        self.fields: dict[str, Any] = {
            "model": job.model,
            "dataset": job.dataset,
            "algorithm": None,
            "method": None,
            "target_sparsity": job.sparsity,  # as given, until the audit records the target it checked
            "pattern": job.pattern,
            "seed": job.seed,
            "calib_seed": job.calib_seed,
            "calib_images": job.calib_images,
            "status": "running",
            "error": None,
            "config_hash": job.config_hash,
            "experiment": job.experiment,
            "ptsbench_version": ptsbench.__version__,
            "rng_scheme": RNG_SCHEME_VERSION,  # how the random streams are seeded (ptsbench/streams.py)
            "git_commit": commit,
            "torch_version": torch.__version__,
            "timm_version": timm.__version__,
            "host": platform.node(),
            "started_at": now(),
        }

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.fields)

    def folder(self, job_dir: Path) -> None:
        self.fields["job_dir"] = str(job_dir)

    def method(self, algorithm: PTSAlgorithm) -> None:
        self.fields.update(algorithm=algorithm.name, method=algorithm.label,
                           algorithm_options=algorithm.options(), method_family=algorithm.family,
                           budget_fraction=algorithm.budget_fraction)

    def method_label(self, algorithm: PTSAlgorithm) -> None:
        """The method's names once its pattern is set: they name an N:M pattern."""
        self.fields.update(method=algorithm.label, method_family=algorithm.family)

    def execution(self, device: torch.device, threads: int, compile_: bool) -> None:
        # the seconds a record reports depend on the threads; a parallel sweep gives each job cores // jobs
        # (cli.threads_per_job)
        self.fields.update(device=str(device), torch_threads=threads, compile=compile_)

    def dense(self, dense: Dense, dense_zeros: Mapping[str, int]) -> list[list[Any]]:
        """The dense weights and the exact zeros they already hold (how many and where); returns where."""
        self.fields.update(dense_top1=dense.top1, dense_top5=dense.top5, dense_source=dense.source,
                           dense_key=dense.key, dense_sha256=dense.sha256,
                           dense_train_seconds=dense.info.get("train_seconds"))
        where = [[name, count] for name, count in dense_zeros.items() if count]
        self.fields.update(dense_zero_weights=sum(count for _, count in where), dense_zero_layers=where)
        return where

    def pruned(self, seconds: float, cost: Mapping[str, Any]) -> None:
        self.fields["prune_seconds"] = seconds
        self.fields.update(cost)

    def audited(self, audit: Audit) -> None:
        self.fields.update(audit.summary())

    def evaluated(self, ev: EvalResult, stats: Any, missed: str | None) -> None:
        """The sparse model's accuracy and the job's status: ok, or target_missed with why."""
        self.fields.update(top1=ev.top1, top5=ev.top5, eval_images=ev.images, eval_seconds=ev.seconds,
                           eval_images_per_second=ev.images_per_second, stats=stats,
                           status="target_missed" if missed else "ok", error=missed)

    def measured(self, values: Mapping[str, Any]) -> None:
        """A group of measurements under the keys its measuring function gives them."""
        self.fields.update(values)

    def failed(self, exc: Exception) -> None:
        """Status failed with the error; a traceback too unless it is a user error (PtsbenchError)."""
        self.fields.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        if not isinstance(exc, PtsbenchError):
            self.fields["traceback"] = traceback.format_exc()

    def interrupted(self) -> None:
        self.fields.update(status="interrupted", error="KeyboardInterrupt")

    def finished(self) -> None:
        self.fields["finished_at"] = now()

    @staticmethod
    def skipped(previous: Mapping[str, Any]) -> dict[str, Any]:
        """The record a job skipped on resume returns: the finished identical job's, marked skipped."""
        return {**previous, "skipped": True}
