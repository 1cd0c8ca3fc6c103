"""Claim verdicts from result records (synthetic records, the real claims code path)."""

from __future__ import annotations

import json

import pandas as pd

from ptsbench.claims import fcpts_claim, unipts_claim, verdict, write_claims


def record(method: str, sparsity: float, top1: float, model: str = "resnet18") -> dict:
    return {"model": model, "method": method, "target_sparsity": sparsity, "top1": top1, "status": "ok", "seed": 0}


def test_verdicts():
    assert verdict(40.0, 30.0) == "holds"
    assert verdict(5.0, 30.0) == "holds in direction only"
    assert verdict(0.3, 30.0) == "does not hold here" and verdict(-2.0, 30.0) == "does not hold here"
    assert verdict(float("nan"), 30.0) == "not measured"


def test_claim_tables_compare_against_the_right_rows(tmp_path):
    rows = [record("fcpts-ste-kde-64it", 0.8, 80.0), record("magnitude-uniform+bn", 0.8, 40.0),
            record("magnitude-erk+bn", 0.8, 70.0), record("pot", 0.8, 75.0),
            record("unipts", 0.9, 60.0), record("pot", 0.9, 10.0), record("unipts-kl", 0.9, 65.0)]
    f = fcpts_claim(pd.DataFrame(rows)).set_index("sparsity").loc[0.8]
    assert f["gain over best"] == 5.0 and f["best baseline"] == "pot 75.00"
    assert f["gain over worst"] == 40.0 and f["verdict (vs best)"] == "holds in direction only"
    u = unipts_claim(pd.DataFrame(rows)).iloc[0]
    assert u["UniPTS - POT"] == 50.0 and bool(u["POT collapses (< 20%)"]) and u["verdict"] == "holds in direction only"

    for i, r in enumerate(rows):  # the same through result files and the markdown writer
        (tmp_path / "pts_methods" / str(i)).mkdir(parents=True)
        (tmp_path / "pts_methods" / str(i) / "result.json").write_text(json.dumps(r))
    text = write_claims(tmp_path, tmp_path / "claims.md")
    assert "holds in direction only" in text and "(technique matrix not run)" in text
