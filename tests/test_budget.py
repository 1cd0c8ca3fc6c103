"""Budget curves: every point of conf/study/budget_curves.yaml composes and buys more work along its curve;
a small curve runs, resumes and lands in the cost-normalised view."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ptsbench.analysis.budget import Point, run_points, study_points
from ptsbench.analysis.report import main as report_main
from ptsbench.analysis.study import collect
from ptsbench.errors import ConfigError
from ptsbench.runner import build_algorithm
from tests.conftest import TINY, compose_config


def test_every_point_composes_and_buys_more_work_along_its_curve():
    points = study_points()
    sparsity = 0.9  # the study's own cells; the claims' repeats add 0.8
    assert {p.sparsity for p in points} == {0.8, 0.9} and \
        {p.model for p in points} == {"mobilenetv2", "vit_tiny"}
    assert len(set(points)) == len(points)  # a point two curves list runs once
    curves: dict[tuple[str, str], list[float]] = {}
    repeats = []  # the reference budget on other cells and seeds
    for point in points:
        cfg = compose_config([*point.overrides, f"sparsity={point.sparsity}", f"seed={point.seed}"])
        algorithm = build_algorithm(cfg)
        work = algorithm.budget_fraction if point.key == "algorithm.budget" else int(cfg.calib.n)
        assert work is not None, point
        if point.sparsity == sparsity and point.seed == 0:
            curves.setdefault((point.model, point.algorithm), []).append(work)
        else:
            repeats.append((point, work))
    for (model, algorithm), work in curves.items():
        assert work == sorted(work) and len(set(work)) == len(work), (model, algorithm, work)
        if len(work) == 1:  # a single point is a method's reference budget, beside its quick preset's curve
            assert work == [1.0] and len(curves.get((model, f"{algorithm}_quick"), [])) >= 2, \
                (model, algorithm)
        else:
            assert len(work) >= 2, (model, algorithm, work)
    assert curves[("vit_tiny", "pot")] == [1.0] and curves[("vit_tiny", "pot_quick")][-1] == 0.25
    # the claims' cells (0.8 and 0.9) at the reference budget, three seeds in the paper's mode
    for point, work in repeats:  # a curve's largest budget, FCPTS's being its reference
        assert work == max(curves[(point.model, point.algorithm)]), point
        assert work == 1.0 or point.algorithm == "pot_quick", point
    paper = {(p.model, p.sparsity, p.seed) for p in points if p.algorithm == "fcpts" and p.value == 1.0}
    assert paper == {(m, s, seed) for m in ("mobilenetv2", "vit_tiny") for s in (0.8, 0.9)
                     for seed in (0, 1, 2)}
    # a curve naming its own models runs only there: POT's 5,000 steps where it still climbs
    assert {p.model for p in points if p.algorithm == "pot_quick" and p.value == 25} == {"vit_tiny"}
    assert study_points(["mobilenetv2"], ["pot_quick"]) == [p for p in points if p.algorithm == "pot_quick"
                                                            and p.model == "mobilenetv2"]
    some = study_points(["vit_tiny"], ["unipts_quick"])
    assert {(p.model, p.algorithm) for p in some} == {("vit_tiny", "unipts_quick")} and len(some) >= 2
    fcpts = build_algorithm(compose_config(["algorithm=fcpts", "algorithm.budget=0.04"]))
    assert fcpts.optim.iterations == 64 and fcpts.label == "fcpts-ste-kde-64it" and \
        fcpts.budget_fraction == 0.04


@pytest.mark.slow
def test_a_small_curve_runs_resumes_and_is_joined_in_the_pareto_view(cache_dir, require_fmnist, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "study"
    points = [Point("resnet18", "fcpts_quick", "algorithm.budget", b, 0.8, 0) for b in (0.05, 0.1)]
    extra = [*TINY, f"cache_dir={cache_dir}", "calib.batch_size=32", "algorithm.optimization.batch_size=32"]
    assert run_points(points, runs, extra) == 0
    first = [json.loads((p.job_dir(runs) / "result.json").read_text()) for p in points]
    assert [r["algorithm_options"]["iterations"] for r in first] == [3, 6]  # 64 x 0.05, 64 x 0.1
    assert {r["method_family"] for r in first} == {"fcpts-ste-kde"} and \
        all(r["status"] == "ok" for r in first)
    assert run_points(points, runs, extra) == 0  # resumed: the finished jobs are not rerun
    again = [json.loads((p.job_dir(runs) / "result.json").read_text()) for p in points]
    assert [r["finished_at"] for r in again] == [r["finished_at"] for r in first]
    collect([runs], out)
    assert report_main([str(out)]) == 0
    table = pd.read_csv(out / "pareto.csv")
    assert sorted(table["method"]) == ["fcpts-ste-kde-3it", "fcpts-ste-kde-6it"]
    assert set(table["method_family"]) == {"fcpts-ste-kde"}
    assert (out / "pareto.png").stat().st_size > 0
    assert table["budget_fraction"].tolist() == pytest.approx(sorted(table["budget_fraction"]))
    # a fresh clone: the study is all that is left; a point at another sparsity and seed is added to it,
    # the committed ones are neither rerun nor dropped
    more = [Point("resnet18", "fcpts_quick", "algorithm.budget", 0.05, 0.5, 1)]
    assert run_points([*points, *more], tmp_path / "fresh", [*extra, f"resume_studies=[{out}]"]) == 0
    assert not points[0].job_dir(tmp_path / "fresh").exists()
    added = json.loads((more[0].job_dir(tmp_path / "fresh") / "result.json").read_text())
    assert (added["target_sparsity"], added["seed"], added["status"]) == (0.5, 1, "ok")
    collect([tmp_path / "fresh"], out, add=True)
    assert len(pd.read_json(out / "records.jsonl", lines=True)) == 3


def test_the_leaderboard_pairs_seeds_on_every_row_at_each_models_discriminating_sparsities():
    from omegaconf import OmegaConf

    from ptsbench.analysis.budget import model_sparsities
    from ptsbench.config import CONF_DIR

    points = study_points(study="leaderboard")
    for model in ("resnet18", "mobilenetv2", "vit_tiny"):
        listed = sorted(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml").discriminating_sparsities)
        assert model_sparsities(model, "highest", "x") == listed[-1:]
        mine = [p for p in points if p.model == model]
        probe = {(p.algorithm, p.sparsity) for p in mine if p.seed == 0} - \
            {(p.algorithm, p.sparsity) for p in mine if p.seed == 2}
        assert all(a.startswith("magnitude_") for a, _ in probe)  # only the heuristics' probe is one seed
        rows = {(p.algorithm, p.key, p.value, p.sparsity) for p in mine} - \
            {(a, "preset", "", s) for a, s in probe}
        for row in rows:  # every other row runs seeds 0-2, so every comparison pairs them
            assert {p.seed for p in mine if (p.algorithm, p.key, p.value, p.sparsity) == row} == {0, 1, 2}, \
                row
        assert {p.sparsity for p in mine if p.algorithm == "wanda_erk_bn"} == set(listed)
        assert {p.sparsity for p in mine if p.algorithm == "fcpts"} == {listed[-1]}
        assert {p.sparsity for p in mine if p.algorithm == "fcpts_quick"} == set(listed)
    for point in points[:: max(1, len(points) // 12)]:  # a spread of them composes
        build_algorithm(compose_config([*point.overrides, f"sparsity={point.sparsity}",
                                        f"seed={point.seed}"]))
    with pytest.raises(ConfigError, match="neither a list nor one of discriminating, highest"):
        model_sparsities("resnet18", "all", "here")
