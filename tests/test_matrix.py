"""The technique matrix driver and the mask comparison, on tiny real jobs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from ptsbench.errors import PtsbenchError
from ptsbench.analysis.overlap import jobs_by_model, mask_overlap, write_mask_report
from ptsbench.analysis.matrix import is_method, job_identity, learned_allocation, matrix_jobs
from ptsbench.analysis.matrix import main as matrix_main
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
    jobs = []
    for allocation in ("erk", "global"):
        job = tmp_path / allocation
        run_job(tiny_cfg("sparsity=0.8", f"algorithm.allocation={allocation}", "save_sparse=true"), job)
        jobs.append(job)
    table = write_mask_report(jobs, tmp_path / "report")
    overall = table[table["layer"] == "all"].iloc[0]
    assert len(table) == 21 + 1
    assert 0.0 < overall["iou"] < 1.0  # different allocations keep different weights
    assert overall["kept_a"] == overall["kept_b"] == round(0.2 * overall["params"])
    assert (table["model"] == "resnet18").all()
    assert (tmp_path / "report" / "layer_sparsity_resnet18.png").stat().st_size > 10_000
    assert "## resnet18" in (tmp_path / "report" / "mask_overlap.md").read_text()


def test_masks_never_pair_jobs_of_different_models(tmp_path):
    jobs = []
    for i, model in enumerate(("resnet18", "vit_tiny_patch16_224", "resnet18")):
        (job := tmp_path / str(i)).mkdir()
        (job / "result.json").write_text(json.dumps({"model": model, "method": "pot", "target_sparsity": 0.8}))
        jobs.append(job)
    assert {m: [j.name for j in g] for m, g in jobs_by_model(jobs).items()} == {
        "resnet18": ["0", "2"], "vit_tiny_patch16_224": ["1"]}
    with pytest.raises(PtsbenchError, match="No two jobs on the same model"):
        write_mask_report(jobs[:2], tmp_path / "report")


@pytest.mark.slow
def test_matrix_cross_applies_a_learned_allocation(tiny_cfg, tmp_path, cache_dir):
    source = tmp_path / "source" / "0"
    run_job(tiny_cfg("algorithm=fcpts_quick_ste", "sparsity=0.7", "algorithm.iterations=3", "algorithm.batch_size=32"),
            source)
    records = load_records([tmp_path / "source"])
    assert learned_allocation(records, "resnet18", 0.7, "fcpts-ste-kde") == source / "allocation.csv"
    assert learned_allocation(records, "resnet18", 0.8, "fcpts-ste-kde") is None
    assert learned_allocation(records, "resnet18", 0.7, "fcpts-ste-kde", seed=0) == source / "allocation.csv"
    assert learned_allocation(records, "resnet18", 0.7, "fcpts-ste-kde", seed=1) is None  # another seed's run
    labels = pd.Series(["unipts", "unipts-kl", "unipts-nodst", "fcpts-ste-kde-64it", "fcpts-ste-kde-hist"])
    assert is_method(labels, "unipts").tolist() == [True, False, False, False, False]
    assert is_method(labels, "fcpts-ste-kde").tolist() == [False, False, False, True, False]
    cells = matrix_jobs(records, "resnet18", 0.7)
    assert {(name, recon) for name, recon, _ in cells} == {
        (a, r) for a in ("uniform", "erk", "global", "fcpts") for r in ("none", "layer", "block")}

    assert matrix_main(["--out", str(out := tmp_path / "matrix"), "--allocations", "erk", "fcpts", "lamp"]) == 2
    code = matrix_main(["--source", str(tmp_path / "source"), "--out", str(out), "--models", "resnet18",
                        "--sparsities", "0.7", "--allocations", "erk", "fcpts", "--reconstructions", "none", "block",
                        "--", *TINY, f"cache_dir={cache_dir}", "algorithm.recon_iterations=2"])
    assert code == 0
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 4 and (table["status"] == "ok").all()
    assert (table["achieved_sparsity"] - 0.7).abs().max() < 1e-6
    fcpts_cells = table[table["method"].str.startswith("magnitude-from_fcpts")]
    assert len(fcpts_cells) == 2
    source_alloc = pd.read_csv(source / "allocation.csv").set_index("name")["zeros"]
    for job in fcpts_cells["job_dir"]:
        assert pd.read_csv(f"{job}/allocation.csv").set_index("name")["zeros"].equals(source_alloc)
    text = (out / "technique_matrix.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")][3:6] == ["top-1 none", "top-1 block", "s none"]
    assert "| fcpts" in text
    record = json.loads((source / "result.json").read_text())
    assert f"{record['top1']:.2f}"[:4] in text  # the method's own top-1 sits beside its allocation's rows


def test_matrix_looks_learned_jobs_up_under_the_recorded_model_name():
    # records say "mobilenetv2_100" and "vit_tiny_patch16_224"; a lookup by config group name found nothing
    assert job_identity("mobilenetv2") == ("mobilenetv2_100", 0)
    assert job_identity("vit_tiny", ["seed=3"]) == ("vit_tiny_patch16_224", 3)
    assert job_identity("resnet18") == ("resnet18", 0)
