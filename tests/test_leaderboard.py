"""The leaderboard page: runs ranked per cell with paired gaps to the leader, the summary at the top of each
model's discriminating range."""

from __future__ import annotations

import pandas as pd

from ptsbench.analysis.leaderboard import leaderboard, summary, write_leaderboard
from ptsbench.analysis.study import write_study


def runs(method: str, top1s, sparsity: float = 0.995, seconds: float = 1.0) -> list[dict]:
    return [{"model": "resnet18", "method": method, "method_family": method, "target_sparsity": sparsity,
             "top1": t, "seed": s, "status": "ok", "dense_top1": 90.0, "prune_seconds": seconds,
             "forward_passes": 10, "backward_passes": 0} for s, t in enumerate(top1s)]


def test_runs_are_ranked_with_paired_gaps_and_the_summary_reads_the_highest_cell(tmp_path):
    records = pd.DataFrame([*runs("magnitude-erk+bn", [40.0, 41.0, 42.0]),
                            *runs("fcpts-x", [80.0, 82.0, 81.0], seconds=60),
                            *runs("pot-y", [85.0]),
                            *runs("magnitude-erk+bn", [88.0, 88.0, 88.0], sparsity=0.98)])
    board = leaderboard(records)
    cell = board[board["sparsity"] == 0.995]
    assert cell["method"].tolist() == ["pot-y", "fcpts-x", "magnitude-erk+bn"]  # by mean top-1
    assert cell["headroom"].iloc[0] == 90.0 - 41.0
    assert cell.set_index("method").loc["fcpts-x", "gap to leader [95% CI]"] == "-5.00 (1 seed)"
    assert cell.set_index("method").loc["magnitude-erk+bn", "gap to leader [95% CI]"] == "-45.00 (1 seed)"
    top = summary(board).iloc[0]  # one seed does not lead the summary where 3-seed runs exist
    assert (top["highest discriminating sparsity"], top["best run"], top["seeds"]) == ("0.995", "fcpts-x", 3)
    assert round(top["% of dense"], 2) == 90.0
    write_study(tmp_path / "lb", records.to_dict("records"), pd.DataFrame(columns=["config_hash"]))
    text = write_leaderboard([tmp_path / "lb"], tmp_path / "out")
    assert "## resnet18 at 0.995 (dense 90.00, headroom 49.00)" in text
    assert (tmp_path / "out" / "leaderboard.csv").is_file()


def test_the_report_states_each_cells_headroom(tmp_path):
    from ptsbench.analysis.report import write_report

    records = [{**r, "achieved_sparsity": 0.995, "eval_images": 10000} for r in
               runs("magnitude-erk+bn", [40.0, 42.0]) + runs("magnitude-global+bn", [30.0])
               + runs("fcpts-x", [80.0])]
    write_study(tmp_path / "lb", records, pd.DataFrame(columns=["config_hash"]))
    write_report([tmp_path / "lb"], tmp_path / "out")
    row = next(line for line in (tmp_path / "out" / "results.md").read_text().splitlines()
               if "(headroom" in line)
    assert "| 49.00 " in row  # 90 - mean(40, 42); FCPTS is not a heuristic
