"""Each model's discriminating range from records: where the best heuristic lost between min_loss and
max_loss."""

from __future__ import annotations

import pandas as pd

from ptsbench.analysis.discriminating import discriminating, losses, main, model_configs, write_model_config
from ptsbench.analysis.study import write_study


def rec(method: str, sparsity: float, top1: float, seed: int = 0, model: str = "resnet18") -> dict:
    family = method
    return {"model": model, "method": method, "method_family": family, "target_sparsity": sparsity,
            "top1": top1, "status": "ok", "seed": seed, "dense_top1": 92.0, "prune_seconds": 1.0}


def test_the_range_follows_the_best_heuristic_of_each_cell(tmp_path):
    rows = [rec("magnitude-erk+bn", 0.9, 91.5), rec("magnitude-erk+bn", 0.95, 90.0),
            rec("magnitude-global+bn", 0.95, 85.0), rec("magnitude-erk+bn", 0.99, 40.0),
            rec("magnitude-erk+bn", 0.99, 42.0, seed=1), rec("magnitude-uniform+bn", 0.99, 10.0),
            rec("magnitude-erk+bn", 0.995, 20.0), rec("fcpts-ste-kde", 0.995, 80.0)]  # not a heuristic
    table = losses(pd.DataFrame(rows), ["magnitude-erk+bn", "magnitude-global+bn", "magnitude-uniform+bn"])
    by = table.set_index("sparsity")
    assert by.loc[0.95, "best heuristic"] == "magnitude-erk+bn" and by.loc[0.99, "loss"] == 92.0 - 41.0
    assert by.loc[0.995, "loss"] == 72.0  # FCPTS does not set the range
    assert discriminating(table, 1.0, 60.0) == {"resnet18": [0.95, 0.99]}


def test_write_replaces_the_model_configs_line_and_the_command_reads_studies(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text("name: x\nsweep_sparsities: [0.5, 0.9]\ntrain_overrides: {}\n")
    write_model_config(path, [0.9, 0.925])
    assert "sweep_sparsities: [0.5, 0.9]\ndiscriminating_sparsities: [0.9, 0.925]  #" in path.read_text()
    write_model_config(path, [0.99])
    assert path.read_text().count("discriminating_sparsities") == 1 and "[0.99]" in path.read_text()
    assert set(model_configs()) == {"resnet18", "mobilenetv2_100", "vit_tiny_patch16_224"}
    write_study(tmp_path / "leaderboard", [rec("magnitude-erk+bn", 0.99, 40.0)],
                pd.DataFrame(columns=["config_hash"]))
    assert main(["--results", str(tmp_path)]) == 0
    assert "resnet18: discriminating_sparsities [0.99]" in capsys.readouterr().out
    assert main(["--results", str(tmp_path / "none")]) == 2
