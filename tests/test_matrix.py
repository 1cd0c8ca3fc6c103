"""The technique matrix driver and the mask comparison, on synthetic studies and tiny real jobs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from ptsbench.analysis import matrix
from ptsbench.analysis.matrix import MatrixSettings, ModelInfo, matrix_cells, model_info, pivot
from ptsbench.analysis.matrix import main as matrix_main
from ptsbench.analysis.overlap import jobs_by_model, mask_overlap, write_mask_report
from ptsbench.analysis.study import collect, job_allocation, study_allocations, study_records, write_study
from ptsbench.errors import PtsbenchError
from ptsbench.results import load_records
from ptsbench.runner import run_job
from tests.conftest import TINY


def test_mask_overlap_counts():
    a = {"l": torch.tensor([True, True, False, False])}
    b = {"l": torch.tensor([True, False, True, False])}
    table = mask_overlap(a, b).set_index("layer")
    assert table.loc["l", "iou"] == pytest.approx(1 / 3)
    assert table.loc["all", "kept_a"] == 2 and mask_overlap(a, a).set_index("layer").loc["all", "iou"] == 1.0


@pytest.mark.slow
def test_masks_report_from_two_jobs(tiny_cfg, tmp_path):
    for allocation in ("erk", "global"):
        run_job(tiny_cfg("sparsity=0.8", f"algorithm.allocation={allocation}", "save_sparse=true"),
                tmp_path / "runs" / allocation)
    table = write_mask_report([tmp_path / "runs"], tmp_path / "report")
    overall = table[table["layer"] == "all"].iloc[0]
    assert len(table) == 21 + 1
    assert 0.0 < overall["iou"] < 1.0  # different allocations keep different weights
    assert overall["kept_a"] == overall["kept_b"] == round(0.2 * overall["params"])
    assert (table["model"] == "resnet18").all()
    assert (tmp_path / "report" / "layer_sparsity_resnet18.png").stat().st_size > 10_000
    assert "## resnet18" in (tmp_path / "report" / "mask_overlap.md").read_text()
    assert len(load_records([tmp_path / "report"])) == 2  # the study beside its tables


def test_masks_never_pair_jobs_of_different_models(tmp_path):
    jobs = []
    for i, model in enumerate(("resnet18", "vit_tiny_patch16_224", "resnet18")):
        (job := tmp_path / str(i)).mkdir()
        (job / "result.json").write_text(json.dumps({"model": model, "method": "pot",
                                                     "target_sparsity": 0.8}))
        jobs.append(job)
    assert {m: [j.name for j in g] for m, g in jobs_by_model(jobs).items()} == {
        "resnet18": ["0", "2"], "vit_tiny_patch16_224": ["1"]}
    with pytest.raises(PtsbenchError, match="No two jobs on the same model"):
        write_mask_report(jobs[:2], tmp_path / "report")
    assert not (tmp_path / "report").exists()  # nothing written before the check


def synthetic_source(tmp_path, seed: int = 0):
    """A source study holding one fcpts_quick job of resnet18 at 0.7 with a two-layer allocation."""
    record = {"model": "resnet18", "method": "fcpts-ste-kde-64it", "target_sparsity": 0.7, "seed": seed,
              "status": "ok", "top1": 81.234, "config_hash": "abc123", "finished_at": "2026-01-01T00:00:00"}
    allocation = pd.DataFrame({"config_hash": "abc123", "name": ["conv1", "fc"], "params": [100, 300],
                               "achieved_sparsity": [0.1, 0.9]})
    write_study(tmp_path / "source", [record], allocation)
    return study_records(tmp_path / "source"), study_allocations(tmp_path / "source")


def test_matrix_cells_replay_the_source_study_allocation(tmp_path):
    settings = MatrixSettings("pts_methods", "magnitude_recon_quick", ("uniform", "erk"),
                              ("fcpts_quick", "unipts_quick"))
    labels = {"fcpts_quick": "fcpts-ste-kde-64it", "unipts_quick": "unipts"}
    records, allocations = synthetic_source(tmp_path)
    model = ModelInfo("resnet18", "resnet18", 0, (0.7,))
    cells = matrix_cells(settings, records, allocations, model, 0.7, tmp_path / "runs", labels,
                         reconstructions=["none", "block", "sparsegpt"])
    # no unipts job in the source: its rows are skipped
    assert [(c.allocation, c.reconstruction) for c in cells] == [
        (a, r) for a in ("uniform", "erk", "fcpts_quick") for r in ("none", "block", "sparsegpt")]
    learned = cells[-2]
    assert learned.job_dir == tmp_path / "runs" / "resnet18" / "0.7" / "fcpts_quick-block"
    assert learned.allocation_file.name == "allocation_from_abc123.csv"
    assert learned.source_allocation["achieved_sparsity"].tolist() == [0.1, 0.9]
    assert f"algorithm.allocation_file={learned.allocation_file.resolve()}" in learned.overrides
    assert "algorithm.allocation_label=fcpts_quick" in learned.overrides
    second_order = cells[-1]  # SparseGPT's update on the same learned allocation
    assert second_order.overrides[0] == "algorithm=sparsegpt_bn" and \
        second_order.allocation_file.parent.name == "fcpts_quick-sparsegpt"
    assert not any(o.startswith("algorithm.reconstruction") for o in second_order.overrides)
    other_seed = ModelInfo("resnet18", "resnet18", 1, (0.7,))  # seed 1 learns another allocation
    assert [c.allocation
            for c in matrix_cells(settings, records, allocations, other_seed, 0.7, tmp_path, labels)
            ].count("fcpts_quick") == 0
    with pytest.raises(PtsbenchError, match="lamp"):
        matrix_cells(settings, records, allocations, model, 0.7, tmp_path, labels, wanted=["lamp"])


def test_matrix_table_names_learned_rows_and_their_methods_own_top1(tmp_path):
    source, _ = synthetic_source(tmp_path)

    def cell(allocation: str, recon: str, top1: float) -> dict:
        learned = allocation == "fcpts_quick"
        options = {"allocation": "from_file" if learned else allocation}
        if recon != "sparsegpt":  # SparseGPT's cells name no reconstruction mode: their algorithm says it
            options["reconstruction"] = recon
        if learned:
            options["allocation_label"] = allocation
        return {"model": "resnet18", "target_sparsity": 0.7, "seed": 0, "status": "ok", "top1": top1,
                "prune_seconds": 1.0, "dense_top1": 90.0, "algorithm_options": options,
                "algorithm": "sparsegpt" if recon == "sparsegpt" else "magnitude"}

    write_study(tmp_path / "matrix", [cell("erk", "none", 70.0), cell("fcpts_quick", "none", 75.0),
                                      cell("fcpts_quick", "block", 79.0),
                                      cell("fcpts_quick", "sparsegpt", 77.5)],
                pd.DataFrame(columns=["config_hash"]))
    text = pivot(study_records(tmp_path / "matrix"), source, {"fcpts_quick": "fcpts-ste-kde-64it"})
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")][3:7] == \
        ["top-1 none", "top-1 block", "top-1 sparsegpt", "s none"]
    row = next(line for line in text.splitlines() if "| fcpts_quick" in line)
    # the method's own top-1 beside its allocation's cells
    assert "81.23" in row and "79" in row and "77.5" in row


@pytest.mark.slow
def test_matrix_cross_applies_a_learned_allocation(tiny_cfg, tmp_path, cache_dir, monkeypatch):
    source = tmp_path / "runs" / "fcpts"
    run_job(tiny_cfg("algorithm=fcpts_quick", "sparsity=0.7", "algorithm.optimization.iterations=3",
                     "algorithm.optimization.batch_size=32"),
            source)
    # a 3-iteration budget labels the source job -3it; the configured fcpts_quick would say -64it
    monkeypatch.setattr(matrix, "method_labels",
                        lambda names: {n: {"fcpts_quick": "fcpts-ste-kde-3it"}.get(n, n) for n in names})
    collect([tmp_path / "runs"], tmp_path / "source")
    code = matrix_main(["--source", str(tmp_path / "source"), "--runs", str(tmp_path / "matrix_runs"),
                        "--out", str(out := tmp_path / "matrix"), "--models", "resnet18",
                        "--sparsities", "0.7", "--allocations", "erk", "fcpts_quick",
                        "--reconstructions", "none", "block", "sparsegpt",
                        "--", *TINY, f"cache_dir={cache_dir}", "algorithm.reconstruction.iterations=2"])
    assert code == 0
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 6 and (table["status"] == "ok").all()
    assert (table["achieved_sparsity"] - 0.7).abs().max() < 1e-6
    fcpts_cells = table[table["method"].str.contains("-from_fcpts_quick")]
    assert len(fcpts_cells) == 3 and "sparsegpt-from_fcpts_quick+bn" in set(fcpts_cells["method"])
    source_zeros = pd.read_csv(source / "allocation.csv").set_index("name")["zeros"]
    allocations = study_allocations(out)
    for config_hash in fcpts_cells["config_hash"]:
        assert job_allocation(allocations, config_hash).set_index("name")["zeros"].equals(source_zeros)
    assert str(tmp_path) not in (out / "records.jsonl").read_text()  # paths inside the runs are relative
    text = (out / "technique_matrix.md").read_text()
    assert "| fcpts_quick" in text
    record = json.loads((source / "result.json").read_text())
    assert f"{record['top1']:.2f}"[:4] in text  # the method's own top-1 sits beside its allocation's rows

    # a fresh clone: no runs folder; the committed study is kept and its tables rebuilt from two sources
    # (an empty one first), the learned method's own top-1 still found in the second
    before = (out / "records.jsonl").read_text()
    (out / "technique_matrix.md").unlink()
    empty = tmp_path / "empty_source"
    empty.mkdir()
    assert matrix_main(["--source", str(empty), str(tmp_path / "source"), "--runs", str(tmp_path / "none"),
                        "--out", str(out), "--report-only"]) == 0
    assert (out / "records.jsonl").read_text() == before
    assert f"{record['top1']:.2f}"[:4] in (out / "technique_matrix.md").read_text()
    # --add keeps the study's jobs beside those of another runs folder; without it the folder replaces them
    other = tmp_path / "other_runs"
    run_job(tiny_cfg("sparsity=0.7", "algorithm.allocation=global"), other / "global")
    assert matrix_main(["--source", str(tmp_path / "source"), "--runs", str(other), "--out", str(out),
                        "--report-only", "--add"]) == 0
    assert len(pd.read_csv(out / "results.csv")) == 7
    assert matrix_main(["--source", str(tmp_path / "source"), "--runs", str(other), "--out", str(out),
                        "--report-only"]) == 0
    assert len(pd.read_csv(out / "results.csv")) == 1


def test_matrix_looks_learned_jobs_up_under_the_recorded_model_name():
    # records say "mobilenetv2_100" and "vit_tiny_patch16_224"; a lookup by config group name found nothing
    assert model_info("mobilenetv2").name == "mobilenetv2_100"
    info = model_info("vit_tiny", ["seed=3"])
    assert (info.name, info.seed) == ("vit_tiny_patch16_224", 3) and 0.9 in info.sweep_sparsities


def test_reconstruction_overrides_skip_the_sparsegpt_column(tmp_path):
    # sparsegpt_bn has no reconstruction node: a study-wide algorithm.reconstruction.* override fails it
    extra = ["threads=1", "algorithm.reconstruction.iterations=2", "+algorithm.reconstruction.lr=0.1"]
    block = matrix.Cell("erk", "block", "resnet18", tmp_path, ())
    sparsegpt = matrix.Cell("erk", "sparsegpt", "resnet18", tmp_path, ())
    assert matrix.cell_extra(block, extra) == extra
    assert matrix.cell_extra(sparsegpt, extra) == ["threads=1"]


def test_layer_charts_draw_every_model_of_a_study(tmp_path):
    from ptsbench.analysis.overlap import write_layer_charts
    records, tables = [], []
    for i, model in enumerate(["mobilenetv2_100", "resnet18"]):
        for j, method in enumerate(["magnitude-erk+bn", "pot-quick"]):
            key = f"h{i}{j}"
            records.append({"config_hash": key, "model": model, "method": method, "target_sparsity": 0.9,
                            "seed": 0, "status": "ok", "top1": 50.0})
            tables.append(pd.DataFrame({"config_hash": key, "name": ["a", "b"],
                                        "achieved_sparsity": [0.8, 0.95]}))
    write_study(tmp_path / "study", records, pd.concat(tables, ignore_index=True))
    paths = write_layer_charts(tmp_path / "study", 0.9, ["magnitude-erk+bn", "pot-quick"],
                               tmp_path / "charts")
    assert sorted(p.name for p in paths) == ["layer_sparsity_mobilenetv2_100_0.9.png",
                                             "layer_sparsity_resnet18_0.9.png"]
    assert all(p.stat().st_size > 5_000 for p in paths)
