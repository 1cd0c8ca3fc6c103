"""End to end through the real console scripts: a multirun of two tiny jobs, its aggregate, the report
command, failures inside a sweep, and the W&B mirror in offline mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, TINY

BIN = Path(sys.executable).parent


def run_cli(args: list[str], cache_dir: Path, cwd: Path,
            extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PTSBENCH_CACHE": str(cache_dir), "HYDRA_FULL_ERROR": "0", **(extra_env or {})}
    return subprocess.run([str(BIN / "ptsbench"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_multirun_of_two_jobs_aggregates(cache_dir, require_fmnist, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, "algorithm.allocation=uniform,global", "algorithm.bn_recalibration=true",
                    "sparsity=0.8", f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.csv", "results.md", "accuracy_vs_sparsity.png"):
        assert (sweep / name).exists(), name
    table = pd.read_csv(sweep / "results.csv")
    assert len(table) == 2 and set(table["status"]) == {"ok"}
    assert table["method"].tolist() == ["magnitude-global+bn", "magnitude-uniform+bn"]  # sorted
    assert (table["achieved_sparsity"] - 0.8).abs().max() < 1e-6
    assert (sweep / "0" / ".hydra" / "config.yaml").exists()  # Hydra provenance kept
    md = (sweep / "results.md").read_text()
    assert "magnitude-global+bn" in md and "2 jobs" in md

    # ptsbench-report rebuilds the same table from the result files
    out = tmp_path / "report"
    rep = subprocess.run([str(BIN / "ptsbench-report"), str(sweep), "--out", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    rebuilt = pd.read_csv(out / "results.csv")
    pd.testing.assert_frame_equal(rebuilt.drop(columns=["job_dir"]), table.drop(columns=["job_dir"]))
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 10_000


@pytest.mark.slow
def test_default_benchmark_sweep_skips_the_filtered_cells(cache_dir, require_fmnist, tmp_path):
    """experiment=fmnist_benchmark through the real CLI and hydra-filter-sweeper, its grid replaced from the
    command line (as in `bash scripts/bench.sh model=...`): magnitude runs at both sparsities, FCPTS only
    at resnet18's discriminating 0.98, and the skipped cell is logged with its reason."""
    sweep = tmp_path / "sweep"
    proc = run_cli(["experiment=fmnist_benchmark", *TINY, "model=resnet18",
                    "algorithm=magnitude_erk_bn,fcpts_quick",
                    "sparsity=0.5,0.98", f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(sweep / "results.csv")
    cells = sorted(zip(table["algorithm"], table["target_sparsity"], strict=True))
    assert cells == [("fcpts", 0.98), ("magnitude", 0.5), ("magnitude", 0.98)]
    assert set(table["status"]) == {"ok"}
    assert "fcpts runs at the model's discriminating sparsities" in proc.stdout + proc.stderr
    assert len(list(sweep.rglob("result.json"))) == 3  # one folder per job, named for what the job is


@pytest.mark.slow
def test_single_job_prints_accuracies(cache_dir, require_fmnist, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, "sparsity=0.7", f"hydra.run.dir={run_dir}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dense top-1" in proc.stdout and "sparse top-1" in proc.stdout
    assert {"result.json", "allocation.csv", "calib_indices.json"} <= {p.name for p in run_dir.iterdir()}


@pytest.mark.slow
def test_failed_job_keeps_the_others_and_exits_nonzero(cache_dir, require_fmnist, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, "sparsity=0.5,1.5", f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path)
    assert proc.returncode != 0
    table = pd.read_csv(sweep / "results.csv")
    assert sorted(table["status"]) == ["failed", "ok"]
    failed = table[table["status"] == "failed"].iloc[0]
    assert "sparsity=1.5 is outside [0, 1)" in failed["error"]
    assert "failed" in (sweep / "results.md").read_text()


@pytest.mark.slow
def test_single_job_bad_input_is_one_paragraph(cache_dir, require_fmnist, tmp_path):
    proc = run_cli([*TINY, "algorithm.allocation=ekr", f"hydra.run.dir={tmp_path / 'run'}"], cache_dir,
                   tmp_path)
    assert proc.returncode == 1
    assert "Unknown allocation 'ekr'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_wandb_offline_mirrors_each_job(cache_dir, require_fmnist, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, "logger=wandb", "sparsity=0.5,0.9", f"hydra.sweep.dir={sweep}"], cache_dir,
                   tmp_path, {"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(sweep.glob("[0-9]*/wandb/offline-run-*"))
    assert len(runs) == 2
    group = str(sweep).strip("/").replace("/", "_").encode()
    for run in runs:
        # an offline run is a protobuf log: config, summary and history are stored in it as plain strings
        (log_file,) = run.glob("run-*.wandb")
        raw = log_file.read_bytes()
        for needle in (group, b"magnitude", b"achieved_sparsity", b"top1", b"target_sparsity", b"calib"):
            assert needle in raw, needle
        tables = [p.name for p in (run / "files" / "media" / "table").glob("*.json")]
        assert any(name.startswith("allocation") for name in tables)
    # one summary run for the sweep, with the results table and the accuracy-vs-sparsity line plot
    summary_runs = list((sweep / "wandb").glob("offline-run-*"))
    assert len(summary_runs) == 1
    media = summary_runs[0] / "files" / "media" / "table"
    assert any(p.name.startswith("results") for p in media.glob("*.json"))
    assert (media / "accuracy_vs_sparsity").is_dir()


def test_readme_commands_are_the_scripts():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line.split("#")[0].strip() for line in readme[:20]
                if line.strip().startswith("bash scripts/")]
    assert commands[:2] == ["bash scripts/bench.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_same_seed_is_bit_identical_across_processes(cache_dir, require_fmnist, tmp_path):
    records = []
    for name in ("a", "b"):
        proc = run_cli([*TINY, "sparsity=0.8", "algorithm.allocation=global",
                        "algorithm.bn_recalibration=true",
                        f"hydra.run.dir={tmp_path / name}"], cache_dir, tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        records.append(json.loads((tmp_path / name / "result.json").read_text()))
    a, b = records
    assert a["mask_hash"] == b["mask_hash"] and a["top1"] == b["top1"] and a["top5"] == b["top5"]
    proc = run_cli([*TINY, "sparsity=0.8", "algorithm.allocation=global", "algorithm.bn_recalibration=true",
                    "calib.seed=7", f"hydra.run.dir={tmp_path / 'c'}"], cache_dir, tmp_path)
    c = json.loads((tmp_path / "c" / "result.json").read_text())
    assert c["calib_seed"] == 7 and a["calib_seed"] == 0  # a different calibration draw is reported as such


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", [
    ["algorithm=fcpts_quick", "algorithm.optimization.iterations=4", "algorithm.optimization.batch_size=32"],
    ["algorithm=unipts_quick", "algorithm.search.population_size=4", "algorithm.search.generations=2",
     "algorithm.search.num_parents=2", "algorithm.search.fitness_set_size=64", "algorithm.training.epochs=1",
     "algorithm.training.batch_size=32"],
    ["algorithm=pot_quick", "algorithm.reconstruction.iterations=4"],
], ids=["fcpts", "unipts", "pot"])
def test_learned_methods_are_bit_identical_across_processes(cache_dir, require_fmnist, tmp_path, algorithm):
    """Same seed, two fresh processes: identical masks (hash of every layer's mask) and accuracy."""
    records = []
    for name in ("a", "b"):
        proc = run_cli([*TINY, "sparsity=0.8", *algorithm, f"hydra.run.dir={tmp_path / name}"], cache_dir,
                       tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        records.append(json.loads((tmp_path / name / "result.json").read_text()))
    a, b = records
    assert a["status"] == b["status"] == "ok"
    assert a["mask_hash"] == b["mask_hash"] and a["top1"] == b["top1"] and a["top5"] == b["top5"]


SWEEP_2 = ["-m", *TINY, "algorithm.allocation=erk,global", "algorithm.bn_recalibration=true", "sparsity=0.8"]


def sweep_records(sweep: Path) -> dict[str, dict]:
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    return {r["method"]: r for r in records}


@pytest.mark.slow
def test_parallel_sweep_gives_the_serial_results(cache_dir, require_fmnist, tmp_path):
    """hydra/launcher=parallel (joblib, 2 processes, 1 torch thread each) against the default serial
    launcher."""
    sweeps = {}
    for name, extra in (("serial", []), ("parallel", ["hydra/launcher=parallel"])):
        sweep = tmp_path / name
        proc = run_cli([*SWEEP_2, *extra, f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        sweeps[name] = sweep_records(sweep)
    serial, parallel = sweeps["serial"], sweeps["parallel"]
    assert set(serial) == set(parallel) == {"magnitude-erk+bn", "magnitude-global+bn"}
    for method in serial:
        assert parallel[method]["mask_hash"] == serial[method]["mask_hash"]
        assert parallel[method]["top1"] == pytest.approx(serial[method]["top1"], abs=1e-9)
    assert (tmp_path / "parallel" / "results.csv").exists()


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_sweep(cache_dir, require_fmnist, tmp_path):
    """submitit_local, the stand-in for Slurm on one machine: each job a submitit process, then the
    aggregate."""
    sweep = tmp_path / "submitit"
    proc = run_cli([*SWEEP_2, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
                    f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = sweep_records(sweep)
    assert {r["status"] for r in records.values()} == {"ok"} and len(records) == 2
    assert len(pd.read_csv(sweep / "results.csv")) == 2
    assert list(sweep.glob(".submitit/*/*_log.out")) or list(sweep.glob("**/*.out"))  # submitit ran the jobs


@pytest.mark.slow
def test_rerun_sweep_in_another_order_skips_finished_jobs_and_keeps_folders_apart(cache_dir, require_fmnist,
                                                                                  tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, "sparsity=0.5,0.7", f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    finished = {p: p.read_bytes() for p in sweep.glob("[0-9]*/**/*") if p.is_file() and p.suffix != ".log"}
    again = ["-m", *TINY, "sparsity=0.6,0.5,0.7", "resume=true", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(again, cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.read_bytes() for p in finished} == finished  # result, allocation, indices, .hydra untouched
    records = [json.loads(p.read_text()) for p in sweep.glob("*/result.json")]
    assert sorted(r["target_sparsity"] for r in records) == [0.5, 0.6, 0.7]
    assert len(pd.read_csv(sweep / "results.csv")) == 3

    layout = tmp_path / "layout"  # a layout of the user's that puts two different jobs in one folder
    proc = run_cli(["-m", *TINY, "sparsity=0.5", "algorithm.allocation=uniform,erk",
                    "hydra.sweep.subdir=${sparsity}", f"hydra.sweep.dir={layout}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = {p.parent.name: json.loads(p.read_text())["method"] for p in layout.glob("*/result.json")}
    assert folders["0.5"] == "magnitude-uniform" and len(folders) == 2 and "magnitude-erk" in folders.values()
    assert "allocation=uniform" in (layout / "0.5" / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_run_folder_that_cannot_be_made_is_one_paragraph(cache_dir, tmp_path):
    (tmp_path / "a_file").write_text("")
    for mode, folder in (([], f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"),
                         (["-m"], f"hydra.sweep.dir={tmp_path / 'a_file'}")):
        proc = run_cli([*mode, *TINY, folder], cache_dir, tmp_path)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "cannot hold the job's files: a file, not a folder" in proc.stderr
