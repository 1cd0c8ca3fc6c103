"""`ptsbench`: the Hydra entry point. One call is one job; `-m` sweeps; a callback aggregates."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from ptsbench.config import CONF_DIR, check_constructor_keys, register_configs
from ptsbench.errors import FolderTaken, PtsbenchError
from ptsbench.paths import why_unwritable
from ptsbench.results import RESULT_FILE, folder_owner, place_job, read_result
from ptsbench.runner import JobFailed, config_hash, run_job
from ptsbench.tracking import Tracker, sweep_group

log = logging.getLogger("ptsbench")

register_configs()

def launcher_jobs(hc) -> int | None:
    """The launcher's `n_jobs` (joblib: parallel jobs on this machine; -1 = one per core), None for the
    others."""
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
    """The GPU of one job of a parallel sweep on one machine: jobs of the joblib launcher take the visible
    GPUs in turn (job number modulo their count) instead of all landing on cuda:0. An explicit
    `device=cuda:N` or `cpu`, a sequential launcher and Slurm (which hands each job its own GPU as cuda:0)
    keep `cfg.device`."""
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


def job_identity(root: DictConfig) -> str:
    """The config hash that the job of this full config (Hydra's node included) records: its task config as
    `app` runs it, with the launcher's device placement (threads are not part of a job's identity)."""
    task = OmegaConf.masked_copy(root, [k for k in root if k != "hydra"])
    task = OmegaConf.create(OmegaConf.to_container(task, resolve=True))
    device = device_per_job(task, root.hydra)
    if device:
        task.device = device
    return config_hash(task)


def job_dir_resolver(preferred: object, *, _root_: DictConfig) -> str:
    """`${ptsbench.job_dir:<layout>}` in hydra.sweep.subdir: the job's folder found by what the job is
    (`ptsbench.results.place_job`), so that Hydra's logs and .hydra files land there from the start."""
    try:
        return place_job(Path(str(_root_.hydra.sweep.dir)), str(preferred), job_identity(_root_))
    except Exception:  # a config that does not resolve: the job reports it, the runner checks its folder
        return str(preferred)


def provenance_resolver(subdir: object, *, _root_: DictConfig) -> str | None:
    """`${ptsbench.provenance:.hydra}` in hydra.output_subdir: no provenance files are written into a folder
    that belongs to another job, nor over a finished one that `resume=true` will skip."""
    try:
        folder, identity = Path(str(_root_.hydra.runtime.output_dir)), job_identity(_root_)
    except Exception:  # resolved outside a job (a sweeper's filter): nothing is written then
        return str(subdir)
    if folder_owner(folder) not in (None, identity):
        return None
    done = read_result(folder / RESULT_FILE) if _root_.get("resume") else None
    skipped = done is not None and done.get("config_hash") == identity and done.get("status") == "ok"
    return None if skipped else str(subdir)


OmegaConf.register_new_resolver("ptsbench.job_dir", job_dir_resolver, replace=True)
OmegaConf.register_new_resolver("ptsbench.provenance", provenance_resolver, replace=True)


def run_in_own_folder(cfg: DictConfig, out_dir: Path, hc, **kwargs) -> dict:
    """`run_job` in `out_dir`; in a sweep whose folder belongs to another job (a layout written without
    ptsbench.job_dir, e.g. hydra.sweep.subdir=${sparsity} over two allocations), in `<folder>-<hash[:8]>`
    with its own provenance files, leaving the other job's files alone. A single run's folder is refused."""
    try:
        return run_job(cfg, out_dir, **kwargs)
    except FolderTaken:
        if hc.mode != RunMode.MULTIRUN:
            raise
    identity = config_hash(cfg)
    moved = out_dir.with_name(f"{out_dir.name}-{identity[:8]}")
    log.warning("%s belongs to another job; this job (config hash %s) runs in %s. Write the layout as "
                "hydra.sweep.subdir='${ptsbench.job_dir:<layout>}' to place each job by what it is.",
                out_dir, identity, moved)
    (moved / ".hydra").mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hc})),
                       ("overrides.yaml", hc.overrides.task)):
        OmegaConf.save(node, moved / ".hydra" / name)
    return run_job(cfg, moved, **kwargs)


def sweep_name(hc) -> str:
    if hc.mode == RunMode.MULTIRUN:
        return sweep_group(hc.sweep.dir)
    return "single"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    if cfg.get("logger"):
        # before instantiate turns `+logger.foo=1` into a TypeError
        check_constructor_keys(cfg.logger, "logger")
    tracker = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else Tracker()
    threads, device = threads_per_job(cfg, hc), device_per_job(cfg, hc)
    with open_dict(cfg):
        if threads:
            cfg.threads = threads
        if device:
            cfg.device = device
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        resume_dirs = [Path(hc.sweep.dir)] if multirun else [out_dir]
        record = run_in_own_folder(cfg, out_dir, hc, tracker=tracker, sweep=sweep_name(hc),
                                   resume_dirs=resume_dirs)
        out_dir = Path(record.get("job_dir") or out_dir)
    except JobFailed as failure:
        log.error("Job failed: %s (recorded in %s)", failure.record["error"],
                  Path(failure.record.get("job_dir") or out_dir) / "result.json")
        if not multirun:
            print(f"ptsbench: {failure.record['error']}", file=sys.stderr)
            sys.exit(1)
        return
    except (PtsbenchError, OSError) as exc:  # nothing could be recorded in the job's folder
        message = str(exc) if isinstance(exc, PtsbenchError) else (
            f"the job's files could not be written in {out_dir}: {why_unwritable(exc)}.")
        log.error("Job not run: %s", message)
        if not multirun:
            print(f"ptsbench: {message}", file=sys.stderr)
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
