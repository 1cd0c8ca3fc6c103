"""`ptsbench`: the Hydra entry point. One call is one job; `-m` sweeps; a callback aggregates."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from ptsbench.config import check_constructor_keys, register_configs
from ptsbench.runner import JobFailed, run_job
from ptsbench.tracking import Tracker, sweep_group

log = logging.getLogger("ptsbench")

register_configs()

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_job_config(overrides: list[str]) -> DictConfig:
    """One job's config from the harness's config directory, for drivers that call `run_job` in-process."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def launcher_jobs(hc) -> int | None:
    """The launcher's `n_jobs` (joblib: parallel jobs on this machine; -1 = one per core), None for the others."""
    n_jobs = hc.launcher.get("n_jobs") if hc.launcher is not None else None
    return int(n_jobs) if n_jobs else None


def threads_per_job(cfg: DictConfig, hc) -> int | None:
    """Explicit `threads`, else cores shared among the launcher's parallel jobs, else torch's default."""
    if cfg.get("threads"):
        return int(cfg.threads)
    n_jobs = launcher_jobs(hc)
    if not n_jobs:
        return None
    cores = os.cpu_count() or 1
    parallel = cores if n_jobs < 0 else min(n_jobs, cores)
    return max(1, cores // parallel)


def device_per_job(cfg: DictConfig, hc, gpus: int | None = None) -> str | None:
    """The GPU of one job of a parallel sweep on one machine: jobs of the joblib launcher take the visible GPUs
    in turn (job number modulo their count) instead of all landing on cuda:0. An explicit `device=cuda:N` or
    `cpu`, a sequential launcher and Slurm (which hands each job its own GPU as cuda:0) keep `cfg.device`."""
    if str(cfg.get("device", "auto")) not in ("auto", "cuda"):
        return None
    if launcher_jobs(hc) in (None, 1):
        return None
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        return None
    return f"cuda:{int(hc.job.num) % gpus}"


def sweep_name(hc) -> str:
    if hc.mode == RunMode.MULTIRUN:
        return sweep_group(hc.sweep.dir)
    return "single"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    if cfg.get("logger"):
        check_constructor_keys(cfg.logger, "logger")  # before instantiate turns `+logger.foo=1` into a TypeError
    tracker = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else Tracker()
    threads, device = threads_per_job(cfg, hc), device_per_job(cfg, hc)
    with open_dict(cfg):
        if threads:
            cfg.threads = threads
        if device:
            cfg.device = device
    try:
        resume_dirs = [Path(hc.sweep.dir)] if hc.mode == RunMode.MULTIRUN else [out_dir]
        record = run_job(cfg, out_dir, tracker, sweep=sweep_name(hc), resume_dirs=resume_dirs)
    except JobFailed as failure:
        log.error("Job failed: %s (recorded in %s)", failure.record["error"], out_dir / "result.json")
        if hc.mode != RunMode.MULTIRUN:
            print(f"ptsbench: {failure.record['error']}", file=sys.stderr)
            sys.exit(1)
        return
    if record.get("skipped"):
        return
    if record["status"] == "target_missed":  # numbers were measured but are not the asked-for sparsity
        log.error("%s (recorded in %s)", record["error"], out_dir / "result.json")
        if hc.mode != RunMode.MULTIRUN:
            print(f"ptsbench: {record['error']}", file=sys.stderr)
            sys.exit(1)
        return
    print(f"{record['method']} on {record['model']} at sparsity {record['target_sparsity']}: "
          f"dense top-1 {record['dense_top1']:.2f}%, sparse top-1 {record['top1']:.2f}% "
          f"(achieved sparsity {record['achieved_sparsity']:.4f}) -> {out_dir}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
