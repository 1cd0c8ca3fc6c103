"""One job: dense model -> calibration draw -> algorithm -> audit -> evaluation -> record.

`run_job` reads the job's config once into a checked `JobSpec` (`ptsbench.jobspec`) and runs three steps on
it (`prepare`, `prune_and_audit`, `evaluate_and_save`) inside `recorded`, which writes result.json (a
`ptsbench.record.JobRecord`) however the job ends. Everything a job produces lands in its own output
directory; a failure is recorded there with its error and never touches other jobs. A job that ran but whose
audited zeros miss its allocation or target gets status `target_missed`, never `ok`
(`ptsbench.audit.target_missed`).
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm
from ptsbench.audit import Audit, audit_model, target_missed
from ptsbench.checkpoint import (
    load_compact_form,
    non_finite_tensors,
    save_compact_form,
    save_dense_form,
    show_names,
)
from ptsbench.config import check_constructor_keys
from ptsbench.cost import PruneCost, inference_cost
from ptsbench.data import CalibrationSet, DataBundle, sample_calibration
from ptsbench.dense import build_model, load_data, load_dense_weights
from ptsbench.errors import ConfigError, DataError, FolderTaken, NonFiniteError, PtsbenchError
from ptsbench.evaluate import EvalResult, collect_logits, evaluate, logit_fidelity
from ptsbench.jobspec import BudgetSpec, JobIdentity, JobSpec, check_budget
from ptsbench.jobspec import config_hash as config_hash  # the job identity the CLI places folders by
from ptsbench.record import JobRecord
from ptsbench.results import (
    ALLOCATION_FILE,
    CALIB_FILE,
    RESULT_FILE,
    claim_folder,
    find_finished,
    read_studies,
    write_csv,
    write_json,
)
from ptsbench.streams import stream_seed
from ptsbench.toolkit.patterns import parse_pattern
from ptsbench.toolkit.sparsity import PrunableLayer, PrunePolicy, describe_policy, find_prunable_layers
from ptsbench.tracking import Tracker

log = logging.getLogger(__name__)

SPARSE_MODEL_FILE = "sparse_model.safetensors"
COMPACT_MODEL_FILE = "sparse_model.compact.safetensors"


def execution_device(threads: int | None, device: str) -> torch.device:
    """Apply the job's thread count and return its device: every entry point that runs a model (a job, a
    zoo export beside a sweep) keeps to its share of the cores."""
    if threads:
        torch.set_num_threads(int(threads))
    return resolve_device(device)


def resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device={name!r} is not a device name (use auto, cpu, cuda or cuda:N).") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={name!r} was asked for but CUDA is not available here; use device=auto or cpu.")
    return device


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def build_algorithm(cfg: DictConfig) -> PTSAlgorithm:
    check_constructor_keys(cfg.algorithm, "algorithm")
    try:
        algorithm = hydra.utils.instantiate(cfg.algorithm, _convert_="all")
    except hydra.errors.InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, PtsbenchError):
            raise cause from None
        raise ConfigError(f"algorithm config could not be built: {cause}") from exc
    if not isinstance(algorithm, PTSAlgorithm):
        raise ConfigError(f"algorithm._target_={cfg.algorithm._target_!r} is not a PTSAlgorithm subclass.")
    return algorithm


def folder_taken(folder: Path, owner: str, identity: str, key: str | None = None) -> str:
    """The refusal of a job folder that already belongs to another job."""
    where = f"{key}={str(folder)!r}" if key else f"The job folder {str(folder)!r}"
    return (f"{where} already belongs to another job (config hash {owner}; this job's is {identity}), and a "
            f"folder holds one job's files. Give this job its own folder{f' ({key}=...)' if key else ''}, or "
            f"delete {folder} to reuse it; an identical job (same config hash) may rerun in it.")


def check_not_empty(spec: JobSpec, data: DataBundle) -> None:
    """An empty split would evaluate to a NaN top-1 (or calibrate on nothing) and still exit 0."""
    for split, dataset, keys in (("train", data.train, "data.train_split, data.limit_train"),
                                 ("evaluation", data.test, "data.val_split, data.limit_test")):
        if len(dataset) == 0:
            raise DataError(f"The {split} set of data={spec.dataset} is empty "
                            f"(root={spec.cfg.data.get('root')!r}); check {keys}.")


def evaluate_model(spec: JobSpec, model: nn.Module, data: DataBundle, device: torch.device,
                   what: str) -> EvalResult:
    return evaluate(model, data.test, device, batch_size=spec.eval.batch_size,
                    num_workers=spec.eval.num_workers, channels_last=spec.eval.channels_last, what=what)


def save_and_verify_sparse(spec: JobSpec, model: nn.Module, layers: list[PrunableLayer], data: DataBundle,
                           out_dir: Path, device: torch.device, expected_top1: float) -> dict[str, Any]:
    """Write both checkpoint forms, reload the compact one into a fresh timm model, audit and evaluate it."""
    sparse_keys = [f"{ly.name}.weight" for ly in layers]
    dense_bytes = save_dense_form(model, out_dir / SPARSE_MODEL_FILE)
    compact_bytes = save_compact_form(model, sparse_keys, out_dir / COMPACT_MODEL_FILE)
    fresh = build_model(spec.cfg, data)
    load_compact_form(fresh, out_dir / COMPACT_MODEL_FILE)
    fresh.to(device)
    fresh_layers = [PrunableLayer(ly.name, fresh.get_submodule(ly.name), ly.kind) for ly in layers]
    reloaded = audit_model(fresh, fresh_layers, spec.target)
    ev = evaluate_model(spec, fresh, data, device, "the reloaded sparse checkpoint")
    if abs(ev.top1 - expected_top1) > 1e-9:
        log.warning("Reloaded compact checkpoint gives top-1 %.4f, the pruned model %.4f", ev.top1,
                    expected_top1)
    return {"checkpoint_bytes": dense_bytes, "compact_checkpoint_bytes": compact_bytes,
            "compact_ratio": compact_bytes / dense_bytes, "reload_top1": ev.top1,
            "reload_achieved_sparsity": reloaded.achieved}


@dataclass
class PreparedJob:
    """Everything the prune step needs, built and checked before any long work finishes."""

    algorithm: PTSAlgorithm
    device: torch.device
    data: DataBundle
    calib: CalibrationSet
    model: nn.Module
    layers: list[PrunableLayer]
    dense_zeros: dict[str, int]  # zeros per prunable layer before pruning: each layer's floor
    dense_logits: torch.Tensor | None


class JobLog:
    """The record of one job and the tracker run that mirrors it."""

    def __init__(self, record: JobRecord, out_dir: Path, tracker: Tracker):
        self.record, self.out_dir, self.tracker = record, out_dir, tracker
        self.tracker_started = False

    def start_tracker(self, **kwargs: Any) -> None:
        self.tracker.start(**kwargs)
        self.tracker_started = True


@contextmanager
def recorded(record: JobRecord, out_dir: Path, tracker: Tracker) -> Iterator[JobLog]:
    """Write result.json and finish the tracker run however the job ends.

    An exception becomes status failed (with its message, and a traceback unless it is a user error) and
    is re-raised as JobFailed for the caller's policy; an interrupt is recorded and re-raised as is.
    """
    job = JobLog(record, out_dir, tracker)
    try:
        yield job
    except KeyboardInterrupt:
        record.interrupted()
        raise
    except Exception as exc:
        record.failed(exc)
        raise JobFailed(record.fields) from exc
    finally:
        record.finished()
        write_json(out_dir / RESULT_FILE, record.fields)
        if job.tracker_started:
            tracker.finish(_summary(record), failed=record["status"] != "ok")


def job_spec(cfg: DictConfig, job: JobLog, refused: PtsbenchError | None = None
             ) -> tuple[JobSpec, PTSAlgorithm]:
    """The job's algorithm and its checked spec; `refused` is an error found before the job's record
    existed (a bad resume_studies), raised once the record names the method."""
    record = job.record
    algorithm = build_algorithm(cfg)  # first, so a failed record still names its method
    record.method(algorithm)
    if refused is not None:
        raise refused
    pattern = parse_pattern(record.identity.pattern)
    algorithm.set_pattern(pattern)  # refuses N:M if it cannot follow it
    budget = BudgetSpec.from_config(cfg)
    check_budget(algorithm, budget)
    record.method_label(algorithm)
    return JobSpec.from_config(cfg, record.identity, pattern, budget), algorithm


def prepare(spec: JobSpec, job: JobLog, algorithm: PTSAlgorithm, sweep: str) -> PreparedJob:
    """Build and check everything (data, calibration draw, model, layers), then the dense weights.

    Everything that can be checked is checked before dense training or any other long work.
    """
    record, cfg = job.record, spec.cfg
    name = f"{spec.model}-{algorithm.label}-{spec.target:g}-s{spec.seed}"
    job.start_tracker(name=name, group=sweep, job_type=algorithm.name,
                      config=OmegaConf.to_container(cfg, resolve=True),
                      tags=[spec.model, spec.dataset, algorithm.name], dir=str(job.out_dir))
    device = execution_device(spec.threads, spec.device)
    record.execution(device, torch.get_num_threads(), spec.compile)
    cache_dir = Path(str(cfg.cache_dir)).expanduser()

    data = load_data(cfg, cache_dir)
    check_not_empty(spec, data)
    calib = sample_calibration(data.train, spec.calib.n, spec.calib.seed, spec.calib.batch_size)
    model = build_model(cfg, data)
    policy = PrunePolicy.from_config(cfg.prune_policy)
    layers = find_prunable_layers(model, policy)
    log.info(describe_policy(layers, policy))
    algorithm.validate(layers, spec.target)

    dense = load_dense_weights(cfg, model, data, cache_dir, device, progress=spec.progress)
    dense_zeros = {ly.name: int((ly.weight == 0).sum()) for ly in layers}
    log_dense_zeros(record.dense(dense, dense_zeros))
    # On a probe set (a few dozen images) top-1 moves in coarse steps, so the dense logits are kept to
    # measure how closely the sparse model follows them; the algorithm may change `model` in place.
    dense_logits = collect_logits(model, data.test, device, spec.eval.batch_size) if spec.probe else None
    calib.data.images = calib.data.images.to(device)
    calib.data.labels = calib.data.labels.to(device)
    write_json(job.out_dir / CALIB_FILE, {"seed": calib.seed, "n": len(calib), "indices": calib.indices,
                                          "split": "train", "dataset": spec.dataset})
    return PreparedJob(algorithm, device, data, calib, model, layers, dense_zeros, dense_logits)


def log_dense_zeros(where: list[list[Any]]) -> None:
    """Exact zeros the dense weights already hold (the shipped fp16 resnet18 has 4), as the record lists
    them. The audit counts them as each layer's floor (`ptsbench.audit.target_missed`)."""
    if where:
        listing = ", ".join(f"{name}: {count}" for name, count in where[:6])
        listing += " ..." if len(where) > 6 else ""
        log.info("The dense weights already hold %d zero weights in %d prunable layers (%s); where the "
                 "allocation asks for fewer, they are the layer's floor, not a miss.",
                 sum(count for _, count in where), len(where), listing)


def prune_and_audit(spec: JobSpec, job: JobLog, prep: PreparedJob
                    ) -> tuple[PruneResult, list[PrunableLayer], Audit]:
    """Run the algorithm, then count its zeros ourselves on the model it returned."""
    torch.manual_seed(stream_seed("job.torch", spec.seed))
    ctx = PruneContext(calib=prep.calib, device=prep.device, seed=spec.seed, progress=spec.progress,
                       compile=spec.compile, log_metrics=job.tracker.log, workdir=job.out_dir)
    start = time.perf_counter()
    with PruneCost(prep.model, prep.device) as cost:  # passes and peak memory, counted by the harness
        result = prep.algorithm.prune(prep.model, prep.layers, spec.target, ctx)
    job.record.pruned(time.perf_counter() - start, cost.record())
    bad = non_finite_tensors(result.model.state_dict())
    if bad:
        raise NonFiniteError(f"After the pruning step of {prep.algorithm.label}, the model holds NaN or inf "
                             f"in {len(bad)} tensor(s): {show_names(bad)}. The job stops before the audit "
                             f"and the evaluation, which would report the chance accuracy of NaN logits.")

    sparse_layers = [PrunableLayer(ly.name, result.model.get_submodule(ly.name), ly.kind)
                     for ly in prep.layers]
    shape = prep.data.spec
    audit = audit_model(result.model, sparse_layers, spec.target, result.allocation,
                        pattern=prep.algorithm.pattern,
                        input_shape=(1, shape.in_chans, shape.img_size, shape.img_size))
    job.record.audited(audit)
    write_csv(job.out_dir / ALLOCATION_FILE, audit.layers)
    for table_name, table in result.tables.items():
        write_csv(job.out_dir / f"{table_name}.csv", table)
    return result, sparse_layers, audit


def evaluate_and_save(spec: JobSpec, job: JobLog, prep: PreparedJob, result: PruneResult,
                      sparse_layers: list[PrunableLayer], audit: Audit) -> None:
    """Top-1/top-5 of the sparse model, the status (ok or target_missed), and the optional checkpoints."""
    record, device = job.record, prep.device
    ev = evaluate_model(spec, result.model, prep.data, device, f"the sparse model ({prep.algorithm.label})")
    missed = target_missed(audit, prep.dense_zeros)
    record.evaluated(ev, result.stats, missed)
    record.measured(inference_cost(result.model, sparse_layers, prep.data.test, device,
                                   prep.algorithm.pattern, spec.eval.batch_size))
    if missed:
        log.error("%s", missed)
    if prep.dense_logits is not None:
        sparse_logits = collect_logits(result.model, prep.data.test, device, spec.eval.batch_size)
        record.measured(logit_fidelity(prep.dense_logits, sparse_logits))
    log.info("%s on %s at target %.3f (achieved %.4f): dense top-1 %.2f%%, sparse top-1 %.2f%% "
             "(top-5 %.2f%%), pruned in %.1f s", prep.algorithm.label, spec.model, spec.target,
             audit.achieved, record["dense_top1"], ev.top1, ev.top5, record["prune_seconds"])
    if spec.save_sparse:
        record.measured(save_and_verify_sparse(spec, result.model, sparse_layers, prep.data, job.out_dir,
                                               device, ev.top1))
    job.tracker.log_table("allocation", audit.layers)


def run_job(cfg: DictConfig, out_dir: Path, tracker: Tracker | None = None, sweep: str = "single",
            resume_dirs: list[Path] | None = None) -> dict[str, Any]:
    """Run one job and write its files into `out_dir`; returns the record (status ok or target_missed).

    A failure is recorded (status failed) and raised as JobFailed. With `cfg.resume`, a job whose config
    hash already finished under `resume_dirs` (default: `out_dir`) or is an ok record of one of the
    collected studies `cfg.resume_studies` (a fresh clone's committed results) is skipped and the earlier
    record returned. A folder holds one job: `out_dir` is claimed with the config hash (identity file), and
    a folder that belongs to another job raises FolderTaken before anything is written into it.
    """
    identity = JobIdentity.from_config(cfg)
    record = JobRecord(identity, git_commit())
    refused: PtsbenchError | None = None
    try:  # resume_studies is read whatever `resume` says; a bad entry fails the job inside its record
        studies = read_studies(str(s) for s in cfg.get("resume_studies") or [])
        done = (find_finished(identity.config_hash, resume_dirs or [out_dir], studies)
                if cfg.get("resume") else None)
    except PtsbenchError as exc:
        refused, done = exc, None
    if done is not None:
        previous, where = done
        log.info("resume: identical config already finished in %s; skipping", where)
        return JobRecord.skipped(previous)
    owner = claim_folder(out_dir, identity.config_hash)
    if owner is not None:  # nothing is written there: its files stay the other job's
        raise FolderTaken(folder_taken(out_dir, owner, identity.config_hash))
    record.folder(out_dir)
    with recorded(record, out_dir, tracker or Tracker()) as job:
        spec, algorithm = job_spec(cfg, job, refused)
        prep = prepare(spec, job, algorithm, sweep)
        result, sparse_layers, audit = prune_and_audit(spec, job, prep)
        evaluate_and_save(spec, job, prep, result, sparse_layers, audit)
    return record.fields


SUMMARY_KEYS = ("target_sparsity", "achieved_sparsity", "achieved_sparsity_all", "dense_top1", "top1", "top5",
                "prune_seconds", "eval_seconds", "status", "error")


def _summary(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in SUMMARY_KEYS}


class JobFailed(Exception):
    """Raised after a failed job's record has been written."""

    def __init__(self, record: dict[str, Any]):
        super().__init__(record.get("error"))
        self.record = record
