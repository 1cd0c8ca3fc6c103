"""Accuracy against pruning cost (ptsbench/analysis/pareto.py): the front on a hand-made example, seeds
averaged, failed jobs left out, records without method_family/budget_fraction, and `ptsbench-report`
writing pareto.{csv,md,png} from a folder of result.json files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ptsbench.analysis.pareto import method_points, pareto_front
from ptsbench.analysis.report import main as report_main
from ptsbench.analysis.report import results_table
from ptsbench.results import RESULT_FILE, write_json


def record(**fields) -> dict:
    base = {"model": "resnet18", "dataset": "fashion_mnist", "method": "magnitude-uniform",
            "algorithm": "magnitude", "algorithm_options": {}, "pattern": "unstructured",
            "target_sparsity": 0.9, "achieved_sparsity": 0.9, "dense_top1": 92.5, "top1": 50.0,
            "prune_seconds": 1.0, "forward_passes": 1024, "backward_passes": 0, "seed": 0, "status": "ok",
            "error": None}
    return {**base, **fields}


def test_front_keeps_ties_and_drops_dominated_points():
    #         A     B     C (= B)  D: worse than B  E    F: A's cost, lower  G: E's top-1, dearer  H: no cost
    cost = [1.0, 2.0, 2.0, 3.0, 4.0, 1.0, 5.0, float("nan")]
    top1 = [50.0, 60.0, 60.0, 55.0, 70.0, 40.0, 70.0, 99.0]
    front = pareto_front(cost, top1)
    assert front.iloc[:7].tolist() == [True, True, True, False, True, False, False]
    assert pd.isna(front.iloc[7])  # unknown cost: not on the front, and it does not push E off it either


def test_seeds_are_averaged_and_only_ok_jobs_count():
    table = results_table(pd.DataFrame([
        record(method="a", top1=60.0, prune_seconds=10.0, seed=0),
        record(method="a", top1=70.0, prune_seconds=20.0, seed=1),
        record(method="b", top1=64.0, prune_seconds=16.0),
        # would dominate everything if it counted
        record(method="c", top1=99.0, prune_seconds=0.1, status="failed", error="boom"),
        record(method="a", top1=99.0, prune_seconds=0.1, seed=2, status="target_missed"),
    ]))
    points = method_points(table).set_index("method")
    assert sorted(points.index) == ["a", "b"]
    assert points.loc["a", "top1"] == 65.0 and points.loc["a", "prune_seconds"] == 15.0
    assert points.loc["a", "seeds"] == 2 and points.loc["b", "seeds"] == 1
    # b (16 s, top-1 64) is slower and worse than a
    assert bool(points.loc["a", "front_seconds"]) and not bool(points.loc["b", "front_seconds"])
    assert method_points(results_table(pd.DataFrame([record(status="failed")]))).empty


def test_calibration_sizes_stay_apart_and_join_one_family():
    """The one-shot methods' budget is the calibration set: three sizes of one method on one cell are three
    points of one curve, not one point averaged as if they were seeds."""
    rows = [record(method="wanda-uniform+bn", method_family="wanda-uniform+bn", calib_images=n, top1=t,
                   prune_seconds=s) for n, t, s in ((256, 60.0, 5.0), (1024, 70.0, 15.0), (4096, 72.0, 50.0))]
    rows.append(record(method="magnitude-erk+bn", calib_images=1024, top1=65.0))
    rows.append(record(method="wanda-uniform+bn", model="vit_tiny", calib_images=1024, top1=40.0))
    table = results_table(pd.DataFrame(rows))
    points = method_points(table)
    cnn = points[points["model"] == "resnet18"].set_index("method")
    assert sorted(cnn.index) == ["magnitude-erk+bn", "wanda-uniform+bn-n1024", "wanda-uniform+bn-n256",
                                 "wanda-uniform+bn-n4096"]
    assert cnn.loc["wanda-uniform+bn-n256", "top1"] == 60.0 and \
        cnn.loc["wanda-uniform+bn-n4096", "seeds"] == 1
    assert set(cnn["method_family"]) == {"wanda-uniform+bn", "magnitude-erk+bn"}
    # one size on a cell: the label stays as the method gives it
    assert points[points["model"] == "vit_tiny"]["method"].tolist() == ["wanda-uniform+bn"]


def test_missing_family_and_budget_fall_back_to_the_label():
    old = results_table(pd.DataFrame([record(method="fcpts-quick-64it",
                                             algorithm_options={"budget": "quick"})]))
    assert "method_family" not in old and "budget_fraction" not in old
    p = method_points(old).iloc[0]
    assert p["method_family"] == "fcpts-quick-64it" and pd.isna(p["budget_fraction"]) and \
        p["budget"] == "quick"
    mixed = results_table(pd.DataFrame([
        record(method="fcpts-quick-64it", method_family="fcpts", budget_fraction=0.04),
        record(method="wanda-uniform", method_family=None, budget_fraction=None),
    ]))
    points = method_points(mixed).set_index("method")
    assert points.loc["fcpts-quick-64it", "method_family"] == "fcpts"
    assert points.loc["fcpts-quick-64it", "budget_fraction"] == 0.04
    assert points.loc["wanda-uniform", "method_family"] == "wanda-uniform"
    assert pd.isna(points.loc["wanda-uniform", "budget_fraction"])


def test_fronts_against_seconds_and_passes_differ_and_cells_stay_apart():
    table = results_table(pd.DataFrame([
        # fast on this machine but many images; slow but few images
        record(method="x", top1=60.0, prune_seconds=1.0, forward_passes=20_000, backward_passes=20_000),
        record(method="y", top1=61.0, prune_seconds=5.0, forward_passes=1024, backward_passes=0),
        record(method="z", top1=59.0, prune_seconds=2.0, forward_passes=2048, backward_passes=0),
        # another sparsity: would dominate x, y and z if the cells were mixed
        record(method="z", target_sparsity=0.5, top1=90.0, prune_seconds=0.5, forward_passes=10),
    ]))
    cell = method_points(table).query("target_sparsity == 0.9").set_index("method")
    assert cell["passes"].to_dict() == {"x": 40_000, "z": 2048, "y": 1024}
    assert list(cell.index) == ["x", "z", "y"]  # sorted by seconds
    assert cell["front_seconds"].tolist() == [True, False, True]
    assert cell["front_passes"].tolist() == [False, False, True]


def job(root: Path, name: str, **fields) -> None:
    write_json(root / name / RESULT_FILE, record(**fields))


def md_rows(text: str, section: str) -> dict[str, list[str]]:
    """The table rows of one section of pareto.md, by method: the cells after the method column."""
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines()
            if line.startswith("| ")]
    return {r[1]: r[2:] for r in rows[1:]}


def test_report_writes_pareto_files(tmp_path):
    sweep = tmp_path / "sweep"
    job(sweep, "fq0", method="fcpts-quick-64it", method_family="fcpts", budget_fraction=0.04, top1=80.0,
        prune_seconds=30.0, forward_passes=4096, backward_passes=4096)
    job(sweep, "fq1", method="fcpts-quick-64it", method_family="fcpts", budget_fraction=0.04, top1=82.0,
        prune_seconds=34.0, forward_passes=4096, backward_passes=4096, seed=1)
    job(sweep, "fr", method="fcpts", method_family="fcpts", budget_fraction=1.0, top1=88.0,
        prune_seconds=700.0, forward_passes=102_400, backward_passes=102_400)
    job(sweep, "mag", method="magnitude-uniform", top1=40.0, prune_seconds=0.5)
    job(sweep, "wanda", method="wanda-uniform", top1=39.0, prune_seconds=5.0)  # dominated by magnitude
    job(sweep, "bad", method="sparsegpt-uniform", top1=99.0, prune_seconds=0.1, status="failed", error="x")
    # a one-point cell
    job(sweep, "nm", method="wanda-uniform", pattern="2:4", target_sparsity=0.5, top1=70.0)
    assert report_main([str(sweep)]) == 0
    for name in ("pareto.md", "pareto.csv", "pareto.png"):
        assert (sweep / name).is_file(), name
    assert (sweep / "pareto.png").stat().st_size > 10_000

    text = (sweep / "pareto.md").read_text()
    assert f"`ptsbench-report {sweep}`" in text
    rows = md_rows(text, "resnet18, sparsity 0.9")
    assert list(rows) == ["magnitude-uniform", "wanda-uniform", "fcpts-quick-64it", "fcpts"]  # by seconds
    # budget, seeds, seconds, passes, top-1, front (s), front (passes)
    assert rows["fcpts-quick-64it"] == ["0.04", "2", "32", "8,192", "81.00", "✓", "✓"]
    assert rows["wanda-uniform"][-2:] == ["", ""]
    assert rows["magnitude-uniform"][-2:] == ["✓", "✓"] and rows["fcpts"][-2:] == ["✓", "✓"]
    assert "sparsegpt-uniform" not in text
    assert md_rows(text, "resnet18, sparsity 0.5, 2:4")["wanda-uniform"][-2:] == ["✓", "✓"]

    csv = pd.read_csv(sweep / "pareto.csv")
    assert len(csv) == 5 and csv["front_seconds"].sum() == 4


def test_report_writes_no_pareto_without_an_ok_job(tmp_path):
    job(tmp_path, "bad", status="failed", error="x")
    assert report_main([str(tmp_path)]) == 0
    assert (tmp_path / "results.md").is_file() and not (tmp_path / "pareto.md").exists()
