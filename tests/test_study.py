"""Studies: job folders collected into records.jsonl + allocations.csv, reports rebuilt from the study alone,
and the lists of the studies (experiments and study configs) checked against each other."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from ptsbench.analysis.report import write_report
from ptsbench.analysis.study import (
    calibration_indices,
    check_names,
    collect,
    experiment_algorithms,
    experiment_grid,
    job_allocation,
    method_label,
    study_allocations,
    study_config,
    study_records,
)
from ptsbench.config import CONF_DIR
from ptsbench.errors import ConfigError, DataError
from ptsbench.results import RECORDS_FILE, load_records, write_json
from ptsbench.runner import run_job

ROOT = Path(__file__).resolve().parent.parent
NUMBERS = ["target_sparsity", "achieved_sparsity", "dense_top1", "top1", "top5", "prune_seconds", "seed"]


@pytest.mark.slow
def test_a_study_rebuilds_the_report_of_its_job_folders(tiny_cfg, tmp_path):
    runs = tmp_path / "runs"
    for allocation, sparsity in (("erk", 0.7), ("uniform", 0.5), ("global", 0.7)):
        run_job(tiny_cfg(f"algorithm.allocation={allocation}", f"sparsity={sparsity}"),
                runs / "resnet18" / allocation / str(sparsity))
    records = collect([runs], tmp_path / "study")
    assert [(r["method"], r["target_sparsity"]) for r in records] == [
        ("magnitude-erk", 0.7), ("magnitude-global", 0.7), ("magnitude-uniform", 0.5)]
    text = (tmp_path / "study" / RECORDS_FILE).read_text()
    assert str(tmp_path) not in text and records[0]["job"] == "resnet18/erk/0.7"
    calib = calibration_indices(tmp_path / "study")
    assert len(calib) == 3 and all(len(indices) == 128 for indices in calib.values())

    allocations = study_allocations(tmp_path / "study")
    assert len(allocations) == 3 * 21
    own = pd.read_csv(runs / "resnet18" / "erk" / "0.7" / "allocation.csv")
    pd.testing.assert_frame_equal(job_allocation(allocations, records[0]["config_hash"]), own,
                                  check_dtype=False)

    from_jobs = write_report([runs], tmp_path / "report_jobs")
    (tmp_path / "runs_moved").mkdir()
    runs.rename(tmp_path / "runs_moved" / "runs")  # the study alone: the job folders are gone
    from_study = write_report([tmp_path / "study"], tmp_path / "study")
    pd.testing.assert_frame_equal(from_study[NUMBERS + ["method"]], from_jobs[NUMBERS + ["method"]])
    assert (tmp_path / "study" / "accuracy_vs_sparsity.png").stat().st_size > 10_000
    assert "calib_indices" not in from_study  # tables never carry the 128-int lists


def synthetic_job(folder: Path, config_hash: str, status: str, finished_at: str, **fields) -> None:
    record = {"model": "resnet18", "method": "pot", "target_sparsity": 0.8, "seed": 0, "status": status,
              "top1": 50.0, "config_hash": config_hash, "finished_at": finished_at, "job_dir": str(folder)}
    write_json(folder / "result.json", {**record, **fields})
    pd.DataFrame({"name": ["conv1", "fc"], "achieved_sparsity": [0.5, 0.9]}).to_csv(folder / "allocation.csv",
                                                                                    index=False)


def test_collect_keeps_the_finished_run_of_a_config_and_makes_paths_relative(tmp_path):
    runs = tmp_path / "runs"
    synthetic_job(runs / "a", "h1", "failed", "2026-01-02T00:00:00", top1=None)
    synthetic_job(runs / "b", "h1", "ok", "2026-01-01T00:00:00", top1=61.0,
                  algorithm_options={"allocation_file": str(runs / "b" / "from.csv")})
    synthetic_job(runs / "c", "h2", "ok", "2026-01-01T00:00:00", target_sparsity=0.5, top1=70.0)
    records = collect([runs], tmp_path / "study")
    assert [(r["config_hash"], r["top1"], r["job"]) for r in records] == \
        [("h2", 70.0, "c"), ("h1", 61.0, "b")]
    assert records[1]["algorithm_options"]["allocation_file"] == "b/from.csv"
    assert "job_dir" not in records[0]
    lines = (tmp_path / "study" / RECORDS_FILE).read_text().splitlines()
    assert [json.loads(line)["config_hash"] for line in lines] == ["h2", "h1"]
    assert study_allocations(tmp_path / "study")["config_hash"].tolist() == ["h2", "h2", "h1", "h1"]
    assert len(load_records([tmp_path / "study"])) == 2 == \
        len(load_records([tmp_path / "study" / RECORDS_FILE]))
    only_pot = collect([runs], tmp_path / "pot", methods=["pot"])
    assert len(only_pot) == 2
    with pytest.raises(DataError, match="No job folders"):
        collect([runs], tmp_path / "none", methods=["unipts"])
    with pytest.raises(DataError, match="does not exist"):
        collect([tmp_path / "missing"], tmp_path / "none")


def test_collect_with_add_keeps_the_committed_jobs_and_adds_the_new_ones(tmp_path):
    old_runs, new_runs, study = tmp_path / "old", tmp_path / "new", tmp_path / "study"
    synthetic_job(old_runs / "a", "h1", "ok", "2026-01-01T00:00:00", top1=61.0)
    synthetic_job(old_runs / "b", "h2", "ok", "2026-01-01T00:00:00", target_sparsity=0.5, top1=70.0)
    collect([old_runs], study)
    committed = (study / RECORDS_FILE).read_text()
    # a fresh clone: the committed study is all there is of the old runs; one new job, one rerun of h1
    synthetic_job(new_runs / "c", "h3", "ok", "2026-02-01T00:00:00", seed=1, top1=66.0)
    synthetic_job(new_runs / "a2", "h1", "ok", "2026-02-01T00:00:00", top1=62.0)
    records = collect([new_runs], study, add=True)
    assert sorted((r["config_hash"], r["top1"]) for r in records) == \
        [("h1", 62.0), ("h2", 70.0), ("h3", 66.0)]
    assert sorted(study_allocations(study)["config_hash"].tolist()) == ["h1", "h1", "h2", "h2", "h3", "h3"]
    collect([new_runs], tmp_path / "replaced")  # without add only the new runs' jobs are there
    assert len(study_records(tmp_path / "replaced")) == 2
    # adding nothing new rewrites the committed files unchanged
    collect([old_runs], tmp_path / "again")
    (tmp_path / "empty").mkdir()
    synthetic_job(tmp_path / "empty" / "a", "h1", "ok", "2026-01-01T00:00:00", top1=61.0)
    collect([tmp_path / "empty"], tmp_path / "again", add=True)
    assert (tmp_path / "again" / RECORDS_FILE).read_text() == committed


def test_method_labels_come_from_the_algorithm_classes():
    assert method_label("magnitude_erk_bn") == "magnitude-erk+bn"
    assert method_label("magnitude", ["algorithm.allocation=global"]) == "magnitude-global"
    with pytest.raises(ConfigError, match="magnitude_erk"):
        method_label("magnitude_erkbn")


def test_each_sweep_covers_exactly_its_models_sweep_sparsities():
    grid = experiment_grid("fmnist_benchmark")
    wanted = set()
    for model in grid["model"]:
        model_cfg = OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml")
        wanted |= set(model_cfg.sweep_sparsities) | set(model_cfg.discriminating_sparsities)
    assert {float(s) for s in grid["sparsity"]} == wanted
    filters = OmegaConf.load(CONF_DIR / "experiment" / "fmnist_benchmark.yaml").hydra.sweeper.filters
    assert any("ptsbench.sweep.ModelSparsities" in f for f in filters)
    # pts_methods and its seeds run the claims' cells, inside every model's range
    cfg = study_config("claims")
    named = [*cfg.fcpts.sparsities, *cfg.unipts.sparsities]
    claims = {float(s) for s in named if s != "discriminating"}
    assert "discriminating" in named  # and the leaderboard's cells: each model's discriminating_sparsities
    for experiment in ("pts_methods", "pts_methods_seeds"):
        grid = experiment_grid(experiment)
        assert {float(s) for s in grid["sparsity"]} == claims, experiment
        for model in grid["model"]:
            assert claims <= set(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml").sweep_sparsities)
    # the one-shot study runs the levels of the one-shot papers' tables, inside every model's range
    grid = experiment_grid("oneshot")
    for model in grid["model"]:
        assert {float(x) for x in grid["sparsity"]} <= \
            set(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml").sweep_sparsities)


def test_the_studies_lists_are_consistent():
    methods = experiment_algorithms("pts_methods")
    # the analyses select jobs the pts_methods sweep runs
    assert set(check_names("unipts", study_config("unipts").algorithms)) <= set(methods)
    assert set(experiment_algorithms("mask_overlap")) <= set(methods)  # charts drawn from pts_methods
    matrix = study_config("technique_matrix")
    assert matrix.source == "pts_methods" and set(matrix.learned) <= set(methods)
    claims = study_config("claims")
    run = set(methods) | set(experiment_algorithms("fmnist_benchmark"))  # what the claims' studies run
    run |= {a for study in ("leaderboard", "budget_curves") for curve in study_config(study).curves
            for a in curve.algorithms}
    assert {claims.fcpts.method, *claims.fcpts.baselines, claims.unipts.method, claims.unipts.against,
            claims.unipts.plain_kd, *claims.heuristics} <= run
    experiment_algorithms("oneshot")  # every algorithm it names exists


def test_results_script_keeps_no_list_of_its_own():
    script = (ROOT / "scripts" / "results.sh").read_text()
    assert "<<" not in script  # no embedded program
    assert not re.search(r"algorithm=[a-z_]+,", script)  # algorithm lists live in conf/experiment
    assert "sparsity=0." not in script and "SPARSITIES" not in script  # sparsities live in the model configs
    for study in ("fmnist_benchmark", "pts_methods", "unipts", "technique_matrix", "mask_overlap", "oneshot",
                  "budget_curves", "second_dense_model", "claims"):
        assert f"{study}()" in script


def test_study_records_of_an_empty_folder(tmp_path):
    assert study_records(tmp_path).empty
    with pytest.raises(DataError, match="collect the study first"):
        study_allocations(tmp_path)


def test_committed_studies_hold_only_records_of_a_clean_tree():
    from ptsbench.results import is_dirty

    dirty = {}
    for path in sorted((ROOT / "results").glob("*/records.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if is_dirty(record) or not record.get("git_commit"):  # committed results name their code
                dirty.setdefault(path.parent.name, []).append(record.get("method"))
    assert not dirty, {study: len(methods) for study, methods in dirty.items()}


def test_collect_leaves_out_jobs_of_a_dirty_tree(tmp_path, caplog):
    from ptsbench.analysis.study import collect_jobs

    for name, commit in (("a", "abc123"), ("b", "abc123-dirty"), ("c", None)):
        job = tmp_path / "runs" / name
        job.mkdir(parents=True)
        (job / "result.json").write_text(json.dumps({"config_hash": name, "method": "m", "model": "x",
                                                     "target_sparsity": 0.5, "seed": 0, "git_commit": commit,
                                                     "status": "ok"}))
    records, _ = collect_jobs([tmp_path / "runs"])
    assert [r["config_hash"] for r in records] == ["a", "c"] and "Left out 1 job(s)" in caplog.text
