"""Claim verdicts from study records (synthetic records, the real claims code path and study configs)."""

from __future__ import annotations

import pandas as pd

from ptsbench.analysis.claims import (
    fcpts_claim,
    load_settings,
    matrix_claim,
    second_dense_claims,
    unipts_claim,
    verdict,
    write_claims,
)
from ptsbench.analysis.matrix import load_settings as matrix_settings
from ptsbench.analysis.study import write_study

# label -> (family, budget_fraction), as the runner records them
BUDGETS = {"fcpts-ste-kde-64it": ("fcpts-ste-kde", 0.04), "fcpts-ste-kde": ("fcpts-ste-kde", 1.0),
           "unipts-quick-8x5-5ep": ("unipts", 0.057), "unipts-kl-quick-8x5-5ep": ("unipts-kl", 0.057),
           "pot-quick": ("pot", 0.01), "pot-2000steps": ("pot", 0.1)}


def record(method: str, sparsity: float, top1: float, model: str = "resnet18", seed: int = 0,
           dense_top1: float = 92.0) -> dict:
    family, budget = BUDGETS.get(method, (method, None))
    return {"model": model, "method": method, "method_family": family, "budget_fraction": budget,
            "target_sparsity": sparsity, "top1": top1, "status": "ok", "seed": seed, "dense_top1": dense_top1}


def test_verdicts():
    assert verdict(40.0, 30.0) == "holds"
    assert verdict(5.0, 30.0) == "holds in direction only"
    assert verdict(0.3, 30.0) == "does not hold here" and verdict(-2.0, 30.0) == "does not hold here"
    assert verdict(float("nan"), 30.0) == "not measured"
    assert verdict(2.0, 30.0, spread=1.0) == "holds in direction only"
    assert verdict(2.0, 30.0, spread=1.8) == "does not hold here"  # the seed band reaches the tie zone


def test_claims_compare_the_families_of_the_configured_algorithms():
    # conf/study/claims.yaml names algorithm configs; the families are the classes' own labels without budget
    claims = load_settings()
    assert claims.fcpts.method == "fcpts-ste-kde" and claims.fcpts.paper_gain == 30.0
    assert claims.fcpts.baselines == ("magnitude-uniform+bn", "magnitude-erk+bn", "magnitude-global+bn", "pot")
    unipts_families = (claims.unipts.method, claims.unipts.against, claims.unipts.plain_kd)
    assert unipts_families == ("unipts", "pot", "unipts-kl")
    assert claims.studies == ("pts_methods", "fmnist_benchmark", "budget_curves")


def test_each_cell_is_decided_at_the_highest_budget_measured(tmp_path):
    rows = [record("fcpts-ste-kde-64it", 0.9, 60.0), record("fcpts-ste-kde", 0.9, 70.0),
            record("magnitude-erk+bn", 0.9, 65.0), record("pot-quick", 0.9, 20.0), record("pot-2000steps", 0.9, 30.0)]
    f = fcpts_claim(pd.DataFrame(rows), load_settings().fcpts).iloc[0]
    assert f["FCPTS run (highest budget)"] == "fcpts-ste-kde" and f["FCPTS top-1"] == 70.0
    assert f["gain over best"] == 5.0 and f["worst baseline"] == "pot-2000steps 30.00"
    # pooled from two studies: the budget curve's reference run decides, the benchmark's quick one does not
    write_study(tmp_path / "fmnist_benchmark", rows[:1] + rows[2:4], pd.DataFrame(columns=["config_hash"]))
    write_study(tmp_path / "budget_curves", [rows[1], rows[4]], pd.DataFrame(columns=["config_hash"]))
    text = write_claims(tmp_path, tmp_path / "claims" / "claims.md")
    assert "| fcpts-ste-kde " in text and "70.00" in text and "`" + str(tmp_path / "budget_curves") + "`" in text


def test_gains_are_paired_by_seed_and_carry_the_seed_band():
    rows = [record("fcpts-ste-kde-64it", 0.8, 80.0, seed=0), record("fcpts-ste-kde-64it", 0.8, 70.0, seed=1),
            record("magnitude-erk+bn", 0.8, 78.0, seed=0), record("magnitude-erk+bn", 0.8, 64.0, seed=1),
            record("magnitude-erk+bn", 0.8, 50.0, seed=2),  # no FCPTS run with seed 2: not paired
            record("unipts-quick-8x5-5ep", 0.9, 60.0, seed=0), record("pot-quick", 0.9, 59.0, seed=0),
            record("unipts-quick-8x5-5ep", 0.9, 62.0, seed=1), record("pot-quick", 0.9, 50.0, seed=1)]
    claims = load_settings()
    f = fcpts_claim(pd.DataFrame(rows), claims.fcpts).iloc[0]
    assert f["seeds"] == 2 and f["gain over best"] == 4.0  # (80-78 + 70-64) / 2, seed 2 left out
    assert f["± (seeds)"] == "+4.00 ± 2.83" and f["verdict (vs best)"] == "holds in direction only"
    u = unipts_claim(pd.DataFrame(rows), claims.unipts).iloc[0]
    assert u["UniPTS - POT"] == 6.5 and u["seeds"] == 2
    assert u["± (seeds)"] == "+6.50 ± 7.78"
    assert u["verdict"] == "does not hold here"  # gains 1 and 12: the seed band reaches zero


def test_a_one_seed_reference_run_is_shown_beside_the_seed_band_of_the_quick_runs():
    rows = [record("fcpts-ste-kde", 0.9, 75.0, seed=0),
            *(record("fcpts-ste-kde-64it", 0.9, top1, seed=s) for s, top1 in enumerate([70.0, 72.0, 68.0])),
            *(record("magnitude-erk+bn", 0.9, top1, seed=s) for s, top1 in enumerate([65.0, 66.0, 64.0]))]
    claims = load_settings()
    f = fcpts_claim(pd.DataFrame(rows), claims.fcpts).iloc[0]
    assert f["FCPTS run (highest budget)"] == "fcpts-ste-kde" and f["seeds"] == 1 and f["gain over best"] == 10.0
    assert f["gain over best, most seeds"] == "fcpts-ste-kde-64it: +5.00 ± 1.00 (3 seeds)"
    rows = [r for r in rows if r["method"] != "fcpts-ste-kde"]  # the quick runs decide: nothing beside them
    assert fcpts_claim(pd.DataFrame(rows), claims.fcpts).iloc[0]["gain over best, most seeds"] == ""


def test_claim_tables_compare_against_the_right_rows(tmp_path):
    rows = [record("fcpts-ste-kde-64it", 0.8, 80.0), record("magnitude-uniform+bn", 0.8, 40.0),
            record("magnitude-erk+bn", 0.8, 70.0), record("pot-quick", 0.8, 75.0),
            record("unipts-quick-8x5-5ep", 0.9, 60.0), record("pot-quick", 0.9, 10.0), record("unipts-kl-quick-8x5-5ep", 0.9, 65.0)]
    claims = load_settings()
    f = fcpts_claim(pd.DataFrame(rows), claims.fcpts).set_index("sparsity").loc[0.8]
    assert f["gain over best"] == 5.0 and f["best baseline"] == "pot-quick 75.00"
    assert f["gain over worst"] == 40.0 and f["verdict (vs best)"] == "holds in direction only"
    u = unipts_claim(pd.DataFrame(rows), claims.unipts).iloc[0]
    assert u["UniPTS - POT"] == 50.0 and bool(u["POT collapses (< 20%)"]) and u["verdict"] == "holds in direction only"

    # the same through a study's records.jsonl and the markdown writer
    write_study(tmp_path / "pts_methods", rows, pd.DataFrame(columns=["config_hash"]))
    text = write_claims(tmp_path, tmp_path / "claims" / "claims.md")
    assert "holds in direction only" in text and "(technique matrix not run)" in text
    assert "pot-quick 75.00" in text and "(no unipts and pot rows" not in text


def test_matrix_differences_use_only_allocations_with_both_columns():
    settings = matrix_settings()  # learned: fcpts_quick, unipts_quick; heuristic: uniform, erk, global

    def cell(allocation: str, recon: str, top1: float) -> dict:
        learned = allocation in settings.learned
        return {**record("magnitude", 0.9, top1), "algorithm_options.allocation": "from_file" if learned else allocation,
                "algorithm_options.allocation_label": allocation if learned else None,
                "algorithm_options.reconstruction": recon, "algorithm": "sparsegpt" if recon == "sparsegpt" else "magnitude"}

    # a matrix still running: ERK has no reconstruction cells yet, so it must not enter "best alloc"
    cells = [cell("uniform", "none", 10.0), cell("uniform", "layer", 30.0), cell("uniform", "block", 20.0),
             cell("erk", "none", 75.0), cell("fcpts_quick", "none", 80.0), cell("uniform", "sparsegpt", 25.0)]
    row = matrix_claim(pd.DataFrame(cells), settings).iloc[0]
    assert row["sparsegpt - none (best alloc)"] == 15.0 and row["sparsegpt - none (mean over allocs)"] == 15.0
    assert row["cells"] == 6 and row["learned - heuristic alloc (no recon)"] == 5.0
    assert row["layer - none (best alloc)"] == 20.0 and row["block - none (mean over allocs)"] == 10.0
    assert row["block - layer (mean over allocs)"] == -10.0 and row["largest effect"] == "layer - none (mean over allocs)"


def test_a_second_dense_model_is_set_beside_the_same_runs_on_the_shipped_one(tmp_path):
    claims = load_settings()
    assert claims.second_dense == "second_dense_model"
    shipped = [record("fcpts-ste-kde-64it", 0.9, 80.0 + s, seed=s) for s in range(3)]
    shipped += [record("magnitude-erk+bn", 0.9, 79.0, seed=s) for s in range(3)]
    shipped += [record("fcpts-ste-kde", 0.9, 90.0)]  # the reference budget: not run on the second dense model
    shipped += [record("unipts-quick-8x5-5ep", 0.9, 70.0, seed=s) for s in range(2)]
    shipped += [record("pot-quick", 0.9, 10.0, seed=s) for s in range(2)]
    second = [record("fcpts-ste-kde-64it", 0.9, 78.0, seed=s, dense_top1=91.0) for s in range(2)]
    second += [record("magnitude-erk+bn", 0.9, 80.0, seed=s, dense_top1=91.0) for s in range(2)]
    second += [record("unipts-quick-8x5-5ep", 0.9, 70.0, seed=s, dense_top1=91.0) for s in range(2)]
    second += [record("pot-quick", 0.9, 69.75, seed=s, dense_top1=91.0) for s in range(2)]
    table = second_dense_claims(pd.DataFrame(shipped), pd.DataFrame(second), claims).set_index("claim")
    fcpts = table.loc["FCPTS - best baseline"]
    # the same runs only: the quick budget and seeds 0-1 on both sides, not the shipped reference run
    assert fcpts["gain (shipped)"] == 1.5 and fcpts["± (shipped)"].startswith("+1.50 ±")
    assert fcpts["gain (second)"] == -2.0 and fcpts["verdict (second)"] == "does not hold here"
    assert fcpts["verdict (shipped)"] == "holds in direction only"
    assert fcpts["dense top-1 shipped / second"] == "92.00 / 91.00" and fcpts["seeds"] == 2
    unipts = table.loc["UniPTS - POT"]
    assert (unipts["gain (shipped)"], unipts["gain (second)"]) == (60.0, 0.25)
    assert unipts["verdict (second)"] == "does not hold here"
    write_study(tmp_path / "pts_methods", shipped, pd.DataFrame(columns=["config_hash"]))
    write_study(tmp_path / "second_dense_model", second, pd.DataFrame(columns=["config_hash"]))
    text = write_claims(tmp_path, tmp_path / "claims" / "claims.md")
    assert "## With a second dense model" in text and "92.00 / 91.00" in text
